"""The thread policy cpmlive sets at import (``model/runtime/threads.py``): passive OpenMP waits
when torch is not imported yet, a user's own setting and ``CPMLIVE_THREAD_POLICY=off`` respected."""

import os
import subprocess
import sys

import pytest

SHOW = "import os, cpmlive, torch; print(os.environ.get('OMP_WAIT_POLICY'))"


@pytest.mark.parametrize("env, expected", [
    ({}, "PASSIVE"),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
    ({"CPMLIVE_THREAD_POLICY": "off"}, "None"),
])
def test_cpmlive_sets_passive_waits_unless_told_otherwise(env, expected):
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "CPMLIVE_THREAD_POLICY")}
    out = subprocess.run([sys.executable, "-c", SHOW], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout
    assert out.strip() == expected


def test_too_late_once_torch_runs():
    code = "import os, torch; os.environ.pop('OMP_WAIT_POLICY', None); import cpmlive; " \
           "from cpmlive.model.runtime import threads; print(threads.configure())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_the_training_verbs_hand_openmp_its_default_waits_back():
    code = ("import os, cpmlive, cpmlive.cli as cli; from cpmlive.model.runtime import threads; "
            "print(os.environ.get('OMP_WAIT_POLICY'), cli.train.cmd_pretrain.__module__ in cli.TRAINING_MODULES, "
            "cli.infer.cmd_generate.__module__ in cli.TRAINING_MODULES, threads.for_training(), "
            "os.environ.get('OMP_WAIT_POLICY'), threads.for_training())")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "CPMLIVE_THREAD_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=clean)
    assert out.stdout.split() == ["PASSIVE", "True", "False", "True", "None", "False"]
