"""`cai train rm CONFIG.yaml`: train a reward model on preference rows (the `cai mix` output)."""

from __future__ import annotations

import argparse

GROUP = "train"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rm",
        help="train a reward model (Bradley-Terry, soft labels) on preference pairs",
        description="Train a one-output sequence-classification head on a causal LM with a Bradley-Terry loss on "
        "soft labels. Writes OUT_DIR/metrics.jsonl, tb/, curves.png, checkpoints/, final/ and summary.json. "
        "Multi-GPU: `accelerate launch --config_file examples/accelerate/ddp.yaml -m cai train rm CONFIG.yaml`.",
    )
    p.add_argument("config", help="YAML config (see examples/rm.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set lr=2e-5 --set source_weights.ai-harmless=2 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train_rm_command)


def run_train_rm_command(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from cai.train.common import load_train_config, parse_sets
    from cai.train.reward import RewardConfig, run_reward

    config = load_train_config(args.config, RewardConfig, parse_sets(args.sets))
    summary = run_reward(config, resume=args.resume, progress=not args.quiet)
    if PartialState().is_main_process:
        print(summary.render())
    return 0
