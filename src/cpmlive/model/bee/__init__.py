"""CPM-Bee: its config and presets, model, checkpoint formats and registry entry (``family.py``)."""

# The checkpoint layouts its convert writes, "ours" first (here, not in convert.py, so that the
# CLI lists them without importing torch).
FORMATS: tuple[str, ...] = ("ours", "hf", "openbmb")
