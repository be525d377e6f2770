"""`cai train ppo CONFIG.yaml`: PPO of the SFT policy against the reward model (RL-CAI)."""

from __future__ import annotations

import argparse

from cai.cli.trainer_args import add_trainer_args, run_trainer

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
    add_trainer_args(p, "examples/ppo.yaml", "--set kl_coef=0.1 --set max_steps=20")
    p.set_defaults(func=run_train_ppo_command)


def run_train_ppo_command(args: argparse.Namespace) -> int:
    from cai.train.ppo import PPOConfig, run_ppo

    return run_trainer(args, PPOConfig, run_ppo)
