"""Start-up time of one-shot ``cpmlive`` commands, this tree against an older commit, in fresh processes.

Each command runs ``--repeats`` times in a new interpreter, interleaved (floor, ours, reference,
floor, ours, ...) so machine noise hits all alike; the table shows the median wall time and the
median CPU time (user + system of the child), and the CPU time above the floor, ``python -c
"import torch"``, which every command that loads a model pays. The reference is the package at
``--reference`` (a commit, read from git into a temporary directory and put first on
``PYTHONPATH``); both share the same virtualenv and caches.

    python benchmarks/startup.py                       # 5 repeats against 9317c12 (before issue 28 point 13)
    python benchmarks/startup.py --repeats 3 --skip title

Run it by hand (it is not a test); say how loaded the machine was with the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARTICLE = ("新华社北京1月5日电 国务院总理今天在人民大会堂会见了来访的外国代表团，双方就经贸合作、科技交流和"
           "人文往来交换了意见。总理表示，中方愿同各方一道，推动务实合作取得更多成果。")
COMMANDS = {
    "help": ["--help"],
    "usage-error": ["generate", "demo", "你好", "--max-new-tokens", "0"],
    "verb-help": ["title", "--help"],
    "generate": ["generate", "demo", "你好", "--max-new-tokens", "4"],
    "title": ["title", ARTICLE],
}


def extract(commit: str, into: Path) -> Path:
    """``src/`` of ``commit`` under ``into``."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and exit code of one run."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime, child.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference", default="9317c12", help="commit to compare against ('' to skip)")
    parser.add_argument("--skip", action="append", default=[], choices=sorted(COMMANDS))
    args = parser.parse_args()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    python = [sys.executable]
    runs: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"ours": env}
        if args.reference:
            versions["reference"] = {**env, "PYTHONPATH": str(extract(args.reference, Path(tmp)))}
        jobs = [("floor", "import torch", python + ["-c", "import torch"], env)]
        for name, argv in COMMANDS.items():
            if name not in args.skip:
                for version, version_env in versions.items():
                    jobs.append((name, version, python + ["-m", "cpmlive", *argv], version_env))
        for job in jobs:  # one untimed run each: page cache, jieba's cache, .pyc files
            timed(job[2], job[3])
        for _ in range(args.repeats):
            for name, version, argv, job_env in jobs:
                runs.setdefault((name, version), []).append(timed(argv, job_env))
    floor_cpu = statistics.median(cpu for _, cpu, _ in runs[("floor", "import torch")])
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {args.repeats} runs each, median\n")
    print("| command | version | exit | wall s | CPU s | CPU above `import torch` |")
    print("|---|---|---|---|---|---|")
    for (name, version), results in runs.items():
        wall = statistics.median(r[0] for r in results)
        cpu = statistics.median(r[1] for r in results)
        codes = sorted({r[2] for r in results})
        print(f"| {name} | {version} | {','.join(map(str, codes))} | {wall:.2f} | {cpu:.2f} | {cpu - floor_cpu:+.2f} |")
    if args.reference:
        print("\n| command | CPU s ours / reference | wall s ours / reference |")
        print("|---|---|---|")
        for name in COMMANDS:
            if (name, "ours") in runs:
                ours, ref = runs[(name, "ours")], runs[(name, "reference")]
                cpu = statistics.median(r[1] for r in ours) / statistics.median(r[1] for r in ref)
                wall = statistics.median(r[0] for r in ours) / statistics.median(r[0] for r in ref)
                print(f"| {name} | {cpu:.2f} | {wall:.2f} |")


if __name__ == "__main__":
    main()
