"""How good are our AI labels? Agreement with human harmlessness labels, position bias and wall time,
printed next to the published reference points.

    python benchmarks/bench_label.py --pairs ../shared/data/hh-harmless-dev.jsonl.gz --limit 40
    python benchmarks/bench_label.py --pairs ... --limit 40 --cot --principles 4 --model path/to/model

It runs `cai label eval` (resumable: rerun the same command to continue) and writes its outputs
under --out. Reference points (RLAIF, Lee et al. 2023, harmless dialogue): AI-human agreement
69-72% for large labelers, human-human 73-77%; position bias 18% (largest labeler) to 56% (smallest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cai.errors import CaiError
from cai.stages.label_eval import EvalConfig, run_label_eval

REFERENCE = [
    ("agreement, large AI labeler (RLAIF)", "0.69-0.72"),
    ("agreement, human vs human (RLAIF)", "0.73-0.77"),
    ("agreement, always one slot / coin flip", "0.50"),
    ("position bias, largest labeler (RLAIF)", "0.18"),
    ("position bias, smallest labeler (RLAIF)", "0.56"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", required=True, help="human pairs (HH-RLHF .jsonl/.jsonl.gz)")
    ap.add_argument("--constitution", default="constitutions/harmless.yaml")
    ap.add_argument("--out", default="out/bench_label")
    ap.add_argument("--model", default=None, help="default: the bundled Gemma 3 270M")
    ap.add_argument("--engine", default="hf")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--principles", type=int, default=None, help="principles per pair (default all)")
    ap.add_argument("--cot", action="store_true")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    mode = "cot" if args.cot else "direct"
    out = Path(args.out) / f"{mode}-k{args.principles or 'all'}-n{args.limit}"
    config = EvalConfig(
        pairs=args.pairs, constitution=args.constitution, out=out, model=args.model, engine=args.engine,
        limit=args.limit, principles=args.principles, cot=args.cot, batch_size=args.batch_size, seed=args.seed,
        skip_malformed=True,
    )
    try:
        s = run_label_eval(config)
    except CaiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = s.metrics
    print(f"\n{s.rows_total} pairs, labeler {s.model} ({s.engine}, {mode}, {len(s.principles)} principles "
          f"available, k={args.principles or 'all'})")
    print(f"{'ours: agreement with human labels':45s} {m.agreement:.3f}")
    print(f"{'ours: position-bias rate':45s} {m.labels.position_bias_rate:.3f}")
    print(f"{'ours: expected calibration error (10 bins)':45s} {m.ece:.3f}")
    print(f"{'ours: mean confidence |2p-1|':45s} {m.labels.mean_confidence:.3f}")
    per_pair = "n/a (all resumed)" if s.seconds_per_pair is None else f"{s.seconds_per_pair:.2f}"
    print(f"{'ours: wall seconds per pair':45s} {per_pair}")
    for name, value in REFERENCE:
        print(f"{'ref:  ' + name:45s} {value}")
    print(f"outputs: {out}/labels.jsonl, metrics.json, calibration.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
