"""One process of a multi-process training run on CPU (gloo), started by tests/test_ppo_fsdp.py
with the environment `accelerate launch` would give it (RANK, WORLD_SIZE, MASTER_ADDR/PORT, and
ACCELERATE_USE_FSDP for FSDP).

usage: python tests/dist_worker.py {ppo,rm,sft} CONFIG_JSON [--resume] [--stop-after N] [--fake-vllm]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cai.errors import CaiError


def digit_reward(convs: list, texts: list[str]) -> list[float]:
    """A rule-based reward: the number of digits in the response (as in tests/test_ppo.py)."""
    return [float(sum(ch.isdigit() for ch in t)) for t in texts]


def train(trainer: str, config_json: str, resume: bool, stop_after: int | None) -> None:
    if trainer == "ppo":
        from cai.train.ppo import PPOConfig, run_ppo

        config = PPOConfig.model_validate_json(config_json)
        run_ppo(config, resume=resume, stop_after=stop_after, reward_fn=digit_reward, progress=False)
    elif trainer == "rm":
        from cai.train.reward import RewardConfig, run_reward

        run_reward(RewardConfig.model_validate_json(config_json), resume=resume, stop_after=stop_after,
                   progress=False)
    else:
        from cai.train.sft import SFTConfig, run_sft

        run_sft(SFTConfig.model_validate_json(config_json), resume=resume, stop_after=stop_after, progress=False)


def install_fake_vllm() -> None:
    """vllm.LLM as tests/test_ppo.py's model-backed fake: it samples from its own full copy of the
    model, which only the weight sync updates."""
    import sys
    import types

    from test_ppo import ModelBackedLLM

    module = types.ModuleType("vllm")
    module.__version__ = "0.33.0"
    module.LLM = ModelBackedLLM
    module.SamplingParams = lambda **kw: types.SimpleNamespace(kwargs=kw)
    sys.modules["vllm"] = module


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trainer", choices=["ppo", "rm", "sft"])
    p.add_argument("config")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=int)
    p.add_argument("--fake-vllm", action="store_true", help="rollout_engine vllm against a fake vLLM")
    args = p.parse_args()
    if args.fake_vllm:
        install_fake_vllm()
    try:
        train(args.trainer, Path(args.config).read_text(), args.resume, args.stop_after)
    except CaiError as e:
        if args.stop_after is None or "stopped after" not in str(e):
            raise
    import torch.distributed as dist

    if dist.is_initialized():
        # both ranks reach the end before either tears down: a peer that has already exited makes
        # gloo's teardown abort the other process ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
