"""`cai train ppo CONFIG.yaml`: PPO of the SFT policy against the reward model (RL-CAI)."""

from __future__ import annotations

import argparse

GROUP = "train"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ppo",
        help="train the policy with PPO against a reward model (RL-CAI)",
        description="PPO for language models: policy from the SFT model, frozen reference, critic from the reward "
        "model (or a value head), per-token KL penalty, GAE, clipped policy and value losses. Prompts come from "
        "red-team prompt files and the prompts of human preference pairs, at the configured mix. Writes "
        "OUT_DIR/metrics.jsonl, tb/, curves.png, samples.jsonl, checkpoints/, final/ and summary.json.",
    )
    p.add_argument("config", help="YAML config (see examples/ppo.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set kl_coef=0.1 --set max_steps=20 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train_ppo_command)


def run_train_ppo_command(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from cai.train.common import load_train_config, parse_sets
    from cai.train.ppo import PPOConfig, run_ppo

    config = load_train_config(args.config, PPOConfig, parse_sets(args.sets))
    summary = run_ppo(config, resume=args.resume, progress=not args.quiet)
    if PartialState().is_main_process:
        print(summary.render())
    return 0
