"""The CPM-2 family (TsinghuaAI/BAAI 2021): CPM-2 and CPM-2.1, the mixture-of-experts CPM-2 (BASE
layers) and the EVA dialogue models built on its code, on the shared encoder-decoder stack
(``model/encoder_decoder.py``): its config and presets, model, checkpoint formats and registry
entry (``family.py``). Its tokenizer is ``tokenizer/cpm2.py``."""

# The checkpoint layouts its convert writes, "ours" first (here, not in convert.py, so that the
# CLI lists them without importing torch): the original code's (``openbmb``: BAAI's release, the
# model-parallel shards merged), ModelCenter's ``CPM2`` (``modelcenter``), and the T5 key names
# of EVA's HF port (``hf``).
FORMATS: tuple[str, ...] = ("ours", "openbmb", "modelcenter", "hf")
