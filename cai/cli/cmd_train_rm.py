"""`cai train rm CONFIG.yaml`: train a reward model on preference rows (the `cai mix` output)."""

from __future__ import annotations

import argparse

from cai.cli.trainer_args import add_trainer_args, run_trainer

GROUP = "train"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rm",
        help="train a reward model (Bradley-Terry, soft labels) on preference pairs",
        description="Train a one-output sequence-classification head on a causal LM with a Bradley-Terry loss on "
        "soft labels. Writes OUT_DIR/metrics.jsonl, tb/, curves.png, checkpoints/, final/ and summary.json. "
        "Multi-GPU: `accelerate launch --config_file examples/accelerate/ddp.yaml -m cai train rm CONFIG.yaml`.",
    )
    add_trainer_args(p, "examples/rm.yaml", "--set lr=2e-5 --set source_weights.ai-harmless=2")
    p.set_defaults(func=run_train_rm_command)


def run_train_rm_command(args: argparse.Namespace) -> int:
    from cai.train.reward import RewardConfig, run_reward

    return run_trainer(args, RewardConfig, run_reward)
