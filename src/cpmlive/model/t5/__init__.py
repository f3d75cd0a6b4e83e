"""The T5 family of encoder-decoders (T5 v1.0 and v1.1, FLAN-T5, mT5, UMT5), read from HF's
directories as they are published: its config and presets, model (the shared encoder-decoder
stack, ``model/encoder_decoder.py``), checkpoint formats and registry entry (``family.py``)."""

# The checkpoint layouts its convert writes, "ours" first (here, not in convert.py, so that the
# CLI lists them without importing torch).
FORMATS: tuple[str, ...] = ("ours", "hf")
