"""CPM-Ant model and its checkpoints."""

from cpmlive.model.ant import AntCache, CpmAnt, build_model

__all__ = ["AntCache", "CpmAnt", "build_model"]
