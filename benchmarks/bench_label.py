"""Labeler throughput: batched AI-feedback labelling against the naive baseline of one prompt per forward pass.

    flock /tmp/cai_gemma.lock python benchmarks/bench_label.py --pairs ../shared/data/hh-harmless-dev.jsonl.gz

Both sides label the same human pairs with the same model, constitution, principles and prompts; only the
scheduling differs:
- baseline "one prompt at a time": one pair per `judge` call and an engine that runs one prompt per
  forward pass (batch_size=1, no padding), the way a simple judge loop calls a model;
- ours "batched": `--batch-size` pairs per `judge` call (pairs x principles x 2 orders prompts in one
  choice_logprobs call), which the engine sorts by length and runs `--engine-batch` prompts per pass.
Prints seconds per pair for each, the speed-up ratio, how far the two sets of labels differ (padding
in bfloat16 moves the last bits) and the agreement of each with the human labels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cai.errors import CaiError
from cai.stages.label import Labeler, LabelerSettings, load_labeler
from cai.stages.label_eval import human_slot, to_pair
from cai.stages.label_metrics import human_agreement
from cai.stages.pairs import Pair, read_human_pairs


def label_all(labeler: Labeler, pairs: list[Pair], batch_size: int) -> tuple[list[float], float]:
    """(label_prob per pair, wall seconds) labelling `batch_size` pairs per judge call."""
    start = time.perf_counter()
    probs: list[float] = []
    for b in range(0, len(pairs), batch_size):
        for labels in labeler.judge(pairs[b : b + batch_size]):
            probs.append(sum(x.p for x in labels) / len(labels))
    return probs, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", required=True, help="human pairs (HH-RLHF .jsonl/.jsonl.gz)")
    ap.add_argument("--constitution", default="constitutions/harmless.yaml")
    ap.add_argument("--model", default=None, help="default: the bundled Gemma 3 270M")
    ap.add_argument("--limit", type=int, default=32, help="pairs to label (default 32)")
    ap.add_argument("--principles", type=int, default=2, help="principles per pair (default 2)")
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per judge call, batched side (default 16)")
    ap.add_argument("--engine-batch", type=int, default=16, help="prompts per forward pass, batched side")
    ap.add_argument("--dtype", default="auto", help="engine dtype for both sides (default auto)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        human, _ = read_human_pairs(args.pairs, limit=args.limit, skip_malformed=True)
        slots = [human_slot(args.seed, h) for h in human]
        pairs = [to_pair(h, s) for h, s in zip(human, slots)]
        settings = LabelerSettings(constitution=Path(args.constitution), model=args.model,
                                   principles=args.principles, seed=args.seed)
        from cai.engines import load_engine

        baseline = load_labeler(settings, load_engine("hf", args.model, batch_size=1, dtype=args.dtype))
        batched = load_labeler(settings, load_engine("hf", args.model, batch_size=args.engine_batch,
                                                     dtype=args.dtype))
    except CaiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for labeler in (baseline, batched):  # warm-up: first-call allocations are not part of either side
        labeler.judge(pairs[:1])
    base_probs, base_s = label_all(baseline, pairs, 1)
    ours_probs, ours_s = label_all(batched, pairs, args.batch_size)
    n = len(pairs)
    human_a = [s == "A" for s in slots]
    diff = max(abs(a - b) for a, b in zip(base_probs, ours_probs))
    flips = sum((a > 0.5) != (b > 0.5) for a, b in zip(base_probs, ours_probs))
    prompts = n * len(baseline.principles_for(pairs[0])) * 2
    print(f"\n{n} HH pairs x {args.principles} principles x 2 orders = {prompts} prompts, "
          f"labeler {batched.engine.model_id}, dtype {args.dtype}")
    print(f"{'baseline: one prompt at a time':40s} {base_s / n:7.3f} s/pair  ({base_s:.1f}s)")
    print(f"{'ours: batched (' + str(args.batch_size) + ' pairs/call, ' + str(args.engine_batch) + '/pass)':40s} "
          f"{ours_s / n:7.3f} s/pair  ({ours_s:.1f}s)")
    print(f"{'speed-up ours vs baseline':40s} {base_s / ours_s:7.2f}x")
    print(f"{'max |label_prob difference|':40s} {diff:.2e} ({flips} of {n} verdicts differ)")
    print(f"{'agreement with humans (baseline / ours)':40s} {human_agreement(base_probs, human_a):.3f} / "
          f"{human_agreement(ours_probs, human_a):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
