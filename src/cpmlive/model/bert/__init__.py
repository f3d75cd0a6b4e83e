"""The BERT family of encoders (BERT, RoBERTa, the Chinese BERT-wwm and RoBERTa-wwm releases, which
use BERT's layout), read from HF's directories as published: its config and presets, model (the
shared stack's attention in post-norm blocks), checkpoint formats and registry entry (``family.py``).
An encoder fills masked tokens, embeds texts and classifies them; it does not generate."""

# The checkpoint layouts its convert writes, "ours" first (here, not in convert.py, so that the
# CLI lists them without importing torch).
FORMATS: tuple[str, ...] = ("ours", "hf")
