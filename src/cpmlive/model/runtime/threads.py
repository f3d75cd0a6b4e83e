"""How cpmlive's compute threads wait between parallel regions, chosen at start-up.

A decoding step runs hundreds of short parallel regions (PyTorch's OpenMP loops around the native
step). OpenMP's default keeps its idle threads spinning for a while after each region, which is
fast on an idle machine; when other processes take the cores, a spinning thread holds a core the
step's other thread needs, and every region waits a scheduler time slice for the thread that was
put off: on 2 cores with two CPU-bound competitors a step became about 4x slower
(``benchmarks/under_load.py``). So cpmlive asks OpenMP to put idle threads to sleep at once
(``OMP_WAIT_POLICY=PASSIVE``; our native pool, ``csrc/pool.c``, never waits for a thread that has
not started), which the same script measures at no cost on an idle machine.

This must happen before torch starts OpenMP, so :func:`configure` runs when ``cpmlive`` is
imported, and only if torch is not imported yet. A user's own ``OMP_WAIT_POLICY`` stays, and
``CPMLIVE_THREAD_POLICY=off`` leaves OpenMP's defaults. Training is the exception: its steps are
long products back to back, where spinning threads pick up the next region sooner (a demo training
step measured 2-7% faster with OpenMP's defaults), so the training verbs hand the default back
(:func:`for_training`) before they import torch.
"""

from __future__ import annotations

import os
import sys

POLICY_VARIABLE = "CPMLIVE_THREAD_POLICY"
_set_here = False  # whether OMP_WAIT_POLICY is ours (not the user's)


def configure() -> bool:
    """Set the wait policy for this process's OpenMP threads; whether it could still be set."""
    global _set_here
    if os.environ.get(POLICY_VARIABLE) == "off" or "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _set_here = True
    return True


def for_training() -> bool:
    """Give OpenMP its default waits back (a training process) where :func:`configure` set the
    passive ones and torch has not started; whether it did."""
    global _set_here
    if not _set_here or "torch" in sys.modules:
        return False
    os.environ.pop("OMP_WAIT_POLICY", None)
    _set_here = False
    return True


__all__ = ["POLICY_VARIABLE", "configure", "for_training"]
