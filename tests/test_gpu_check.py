"""benchmarks/gpu_check.py's CPU fallback: every stage the GPU run takes runs here, tiny, and
reports a figure (what cannot be checked without a GPU is only the device itself)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_stage_runs_on_the_cpu_fallback():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu"], capture_output=True,
                            text=True, timeout=600, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin",
                                                         "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    stages = {row[0].strip("| "): row[1] for row in rows[1:]}
    assert list(stages) == ["environment", "peak", "pretrain", "mfu", "finetune", "align", "decode", "budget"]
    assert set(stages.values()) == {"ok"}
    budget = next(row for row in rows if row[0].strip("| ") == "budget")[2]
    assert "0 of 6 blocks resident" in budget and "copied from host memory one block ahead" in budget
