"""Ray executor overhead: the same critique-revise job in one process vs on Ray with one worker.

    python benchmarks/bench_ray.py                   # the tiny random model (built here), ~1-2 minutes
    flock /tmp/cai_gemma.lock python benchmarks/bench_ray.py --gemma   # the bundled Gemma 3 270M

Baseline: `cai generate` with the local executor, which loads the engine in this process. Ray run:
the same config with `executor: ray`, one worker, starting a fresh local Ray instance, so its wall
time includes what a user pays: starting Ray, the actor process and its engine, streaming rows
back. Both use one compute thread (OMP_NUM_THREADS=1) so neither gets more CPU than the other.
Prints per run the wall time, the time to the first row on disk and the time after it, then
ray/local ratios. The time to the first row holds Ray's fixed cost (starting Ray, the actor
process, its imports and engine); the time after it is the per-batch cost (shipping batches and
rows), which is what a long job pays; "worker busy" is the time spent inside the batches, so
busy-time differences are compute slowed by contention, the rest is Ray's. The issue's goal, wall-time overhead <= 10%, needs a job
long enough to amortise the fixed cost; the ratios are printed as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cai.stages.critique import CritiqueConfig, run_critique
from cai.store import JsonlStore

CONSTITUTION = """\
name: bench
version: "1"
description: two principles for the Ray benchmark
few_shot: few_shot.yaml
principles:
  - id: harm
    critique: Point out anything harmful in the last response.
    revision: Rewrite the response to remove anything harmful.
    feedback: Which response is less harmful?
  - id: honesty
    critique: Point out any overconfident claim in the last response.
    revision: Rewrite the response so it states its uncertainty.
    feedback: Which response is more honest?
"""


def first_row_clock() -> dict[str, float]:
    """Record when the driver writes its first row (JsonlStore.append is the one write path)."""
    seen: dict[str, float] = {}
    append = JsonlStore.append

    def timed(self, record):
        seen.setdefault(str(self.path), time.perf_counter())
        append(self, record)

    JsonlStore.append = timed  # type: ignore[method-assign]
    return seen


def run(config: CritiqueConfig, seen: dict[str, float]) -> tuple[float, float, float]:
    """(wall, time to the first row, seconds the worker spent inside its batches)."""
    start = time.perf_counter()
    summary = run_critique(config, progress=False)
    return time.perf_counter() - start, seen[str(config.out)] - start, sum(w.busy_seconds for w in summary.workers)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gemma", action="store_true", help="the bundled Gemma 3 270M instead of the tiny model")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "c.yaml").write_text(CONSTITUTION)
        (work / "few_shot.yaml").write_text((ROOT / "prompts" / "critique_revision.yaml").read_text())
        with (work / "prompts.jsonl").open("w") as f:
            for i in range(args.prompts):
                f.write(json.dumps({"prompt": f"How could someone get into a locked car number {i}?"}) + "\n")
        if args.gemma:
            model, options = None, {}
        else:
            from tiny import build_tiny_model

            model, options = str(build_tiny_model(work / "tiny")), {"dtype": "float32", "device": "cpu"}
        base = {"prompts": work / "prompts.jsonl", "constitution": work / "c.yaml", "model": model, "engine_options": options,
                    "rounds": args.rounds, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "seed": 0}
        seen = first_row_clock()
        local = run(CritiqueConfig(out=work / "local.jsonl", **base), seen)
        on_ray = run(CritiqueConfig(out=work / "ray.jsonl", executor="ray", ray_workers=1, **base), seen)
    name = "bundled Gemma 3 270M" if args.gemma else "tiny random model"
    print(f"{name}: {args.prompts} prompts x {args.rounds} rounds, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens, 1 thread, {os.cpu_count()} CPUs")
    for name, (wall, first, busy) in (("local (baseline)", local), ("ray, 1 worker", on_ray)):
        print(f"{name:17} wall {wall:.1f}s, first row {first:.1f}s, after the first row {wall - first:.1f}s, "
              f"worker busy {busy:.1f}s")
    print(f"ratio ray/local:  wall {on_ray[0] / local[0]:.2f}, first row {on_ray[1] / local[1]:.2f}, "
          f"after the first row {(on_ray[0] - on_ray[1]) / (local[0] - local[1]):.2f} "
          f"(overhead {on_ray[0] - local[0]:+.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
