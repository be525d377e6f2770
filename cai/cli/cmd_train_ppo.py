"""`cai train ppo CONFIG.yaml`: PPO of the SFT policy against the reward model (RL-CAI)."""

from __future__ import annotations

import argparse
import os

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
    p.add_argument("--plan", action="store_true",
                   help="print the estimated memory per GPU by component (from the models' config.json only) "
                   "and whether it fits, then exit without training")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="processes for --plan (default: accelerate's WORLD_SIZE, else 1)")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="--plan for FSDP (policy and critic sharded over the processes); default: what "
                   "`accelerate launch` asked for (ACCELERATE_USE_FSDP)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="GPU memory for --plan in GiB (default: the visible GPU's, else 80)")
    p.set_defaults(func=run_train_ppo_command)


def run_train_ppo_command(args: argparse.Namespace) -> int:
    from cai.train.ppo import PPOConfig, run_ppo

    if args.plan:
        return print_plan(args)
    return run_trainer(args, PPOConfig, run_ppo)


def print_plan(args: argparse.Namespace) -> int:
    import torch

    from cai.errors import CaiError
    from cai.train.config import load_train_config, parse_sets
    from cai.train.memory_plan import GIB, model_shape, plan_ppo
    from cai.train.ppo import PPOConfig

    config = load_train_config(args.config, PPOConfig, parse_sets(args.sets))
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise CaiError(f"--world-size must be at least 1, got {world}")
    if args.gpu_memory is not None:
        gpu = int(args.gpu_memory * GIB)
    elif torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(0).total_memory
    else:
        gpu = 80 * GIB
    policy = model_shape(config.model_path())
    critic = None
    if config.critic == "reward_model":
        critic = model_shape(str(config.critic_model or config.reward_model or config.model_path()))
    reward = model_shape(config.reward_model) if config.reward_model else None
    sharded = args.fsdp if args.fsdp is not None else os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    print(plan_ppo(config, policy, critic, reward, world, gpu, sharded=sharded).render())
    return 0
