"""cpmlive: CPM-Live end to end (CPM models of every family and their lifecycle)."""

from cpmlive.model.runtime import threads

__version__ = "0.1.0"
threads.configure()  # before torch starts OpenMP (model/runtime/threads.py)


def load(*args, **kwargs):  # noqa: D103 - documented on cpmlive.api.load
    from cpmlive.api import load as _load

    return _load(*args, **kwargs)


load.__doc__ = "Load a checkpoint directory, 'demo' or a preset: see cpmlive.api.load."
