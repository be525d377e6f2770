"""`cai train sft CONFIG.yaml`: supervised fine-tuning on critique-revise output (SL-CAI)."""

from __future__ import annotations

import argparse

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
    p.add_argument("config", help="YAML config (see examples/sft.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set lr=2e-5 --set packing=true (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train_sft_command)


def run_train_sft_command(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from cai.train.common import load_train_config, parse_sets
    from cai.train.sft import SFTConfig, run_sft

    config = load_train_config(args.config, SFTConfig, parse_sets(args.sets))
    summary = run_sft(config, resume=args.resume, progress=not args.quiet)
    if PartialState().is_main_process:
        print(summary.render())
    return 0
