"""What the trainer benchmarks share: each trainer runs in its own subprocess (a fresh process, so
peak memory is its own) and hands back one JSON line."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import torch

RESULT = "RESULT "


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on CUDA, else this process's peak resident memory."""
    if device() == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def report_result(result: dict) -> None:
    """The worker's side: print the result line the parent reads."""
    print(RESULT + json.dumps(result))


def run_worker(command: list[str], name: str) -> dict:
    """The parent's side: run one worker subprocess and return its result; exit with its stderr if it failed."""
    proc = subprocess.run(command, check=False, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"worker {name} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT):])
