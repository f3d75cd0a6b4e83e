"""CPM-Ant: its config and presets, model, checkpoint formats and registry entry (``family.py``)."""
