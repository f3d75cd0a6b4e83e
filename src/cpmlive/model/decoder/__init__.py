"""The decoder family of today's open models (Llama, Mistral, Qwen2/3, GLM-4, MiniCPM 1/2/3): its
config and presets, model, checkpoint formats (ours, HF's, GGUF) and registry entry (``family.py``)."""

# The checkpoint layouts its convert writes, "ours" first (here, not in convert.py, so that the
# CLI lists them without importing torch).
FORMATS: tuple[str, ...] = ("ours", "hf", "gguf")
