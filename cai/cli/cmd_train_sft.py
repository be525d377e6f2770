"""`cai train sft CONFIG.yaml`: supervised fine-tuning on critique-revise output (SL-CAI)."""

from __future__ import annotations

import argparse

from cai.cli.trainer_args import add_trainer_args, run_trainer

GROUP = "train"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sft",
        help="fine-tune a causal LM on revised responses (loss on the final assistant turn only)",
        description="Supervised fine-tuning on `cai generate` output (or rows with `messages`, or prompt/completion): "
        "the loss covers only the final assistant turn. Writes OUT_DIR/metrics.jsonl, tb/, curves.png, checkpoints/, "
        "final/ and summary.json. Multi-GPU: `accelerate launch --config_file examples/accelerate/ddp.yaml -m cai "
        "train sft CONFIG.yaml`.",
    )
    add_trainer_args(p, "examples/sft.yaml", "--set lr=2e-5 --set packing=true")
    p.set_defaults(func=run_train_sft_command)


def run_train_sft_command(args: argparse.Namespace) -> int:
    from cai.train.sft import SFTConfig, run_sft

    return run_trainer(args, SFTConfig, run_sft)
