"""cpmlive: CPM-Live end to end (CPM-Ant / CPM-Bee models and their lifecycle)."""

__version__ = "0.1.0"
