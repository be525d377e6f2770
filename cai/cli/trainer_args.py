"""What `cai train rm|sft|ppo` share: a YAML config with --set overrides, --resume, --quiet, and the
summary printed once (by the main process under `accelerate launch`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel


def add_trainer_args(p: argparse.ArgumentParser, example: str, set_example: str) -> None:
    p.add_argument("config", help=f"YAML config (see {example})")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config field, e.g. {set_example} (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_trainer(args: argparse.Namespace, config_class: type[BaseModel], train: Callable[..., Any]) -> int:
    """Load and validate the config, train (`train(config, resume=..., progress=...)`), print the summary."""
    from accelerate import PartialState

    from cai.train.common import load_train_config, parse_sets

    config = load_train_config(args.config, config_class, parse_sets(args.sets))
    summary = train(config, resume=args.resume, progress=not args.quiet)
    if PartialState().is_main_process:
        print(summary.render())
    return 0
