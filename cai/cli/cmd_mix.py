"""`cai mix`: AI-labelled harmlessness pairs + human helpfulness pairs -> reward-model train/test sets."""

from __future__ import annotations

import argparse
from pathlib import Path

from cai.stages.flag_filter import FLAG_NAMES

GROUP = None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mix",
        help="mix AI-labelled and human preference pairs into a reward-model dataset",
        description="Draw AI-labelled pairs (`cai label` outputs) and human pairs (HH-RLHF transcripts or "
        "prompt/chosen/rejected) at a declared ratio or exact counts, shuffle them with a seed and split each "
        "source into train/test. Writes DIR/train.jsonl, DIR/test.jsonl and DIR/mix.json.",
    )
    p.add_argument("--config", help="YAML config with the same fields (flags override it)")
    p.add_argument("--ai", action="append", default=None, help="AI-labelled pairs file (repeatable)")
    p.add_argument("--human", action="append", default=None, help="human pairs file (repeatable)")
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--ratio", type=float, default=None, help="share of AI rows (default 0.5; as many rows as fit)")
    p.add_argument("--ai-count", dest="ai_count", type=int, default=None, help="exact number of AI rows")
    p.add_argument("--human-count", dest="human_count", type=int, default=None, help="exact number of human rows")
    p.add_argument("--test-size", dest="test_size", type=float, default=None,
                   help="share of each source held out (default 0.1)")
    p.add_argument("--seed", type=int, default=None, help="shuffle seed (default 0)")
    p.add_argument("--ai-source", dest="ai_source", default=None, help="source tag of AI rows (default ai-harmless)")
    p.add_argument("--human-source", dest="human_source", default=None,
                   help="source tag of human rows (default human-helpful)")
    p.add_argument("--skip-malformed", dest="skip_malformed", action="store_true", default=None,
                   help="skip human rows whose transcripts cannot be parsed instead of stopping")
    p.add_argument("--min-confidence", dest="min_confidence", type=float, default=None, metavar="X",
                   help="drop AI pairs whose label_prob is within X of 0.5 (keep label_prob >= 0.5 + X; "
                   "counted in mix.json)")
    p.add_argument("--drop-flag", dest="drop_flags", action="append", default=None, metavar="FLAG",
                   choices=FLAG_NAMES, help="drop AI rows carrying this flag, e.g. copied_few_shot (repeatable)")
    p.set_defaults(func=run_mix_command)


def run_mix_command(args: argparse.Namespace) -> int:
    from cai.cli.config_args import config_from_args
    from cai.stages.mix import MixConfig, run_mix

    fields = ["ai", "human", "out", "ratio", "ai_count", "human_count", "test_size", "seed", "ai_source",
              "human_source", "skip_malformed", "min_confidence", "drop_flags"]
    config = config_from_args(args, MixConfig, fields, ("ai", "human", "out"), "cai mix")
    summary = run_mix(config)
    print(summary.render())
    out = Path(config.out)
    print(f"wrote {out / 'train.jsonl'}, {out / 'test.jsonl'}, {out / 'mix.json'}")
    return 0
