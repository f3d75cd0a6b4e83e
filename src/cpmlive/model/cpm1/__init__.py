"""CPM-1: its config and presets, model, checkpoint formats and registry entry (``family.py``)."""
