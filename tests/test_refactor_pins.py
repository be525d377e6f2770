"""Pins of the tiny-model RM, SFT and PPO runs: final weights and final metrics, recorded on the code
before the training core was split up (issue 13). Any change to what the trainers compute (data
order, loss, optimizer step, clipping, schedule, rollouts, GAE) moves these numbers; a refactor
that keeps behaviour must not.

The weights are summarised by two float64 reductions over every tensor of final/ (a position-
weighted sum, so swapped or permuted values show, and the sum of squares); the tolerance allows
only last-bit differences of float32 kernels between CPUs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cai.train.ppo import PPOConfig, run_ppo
from cai.train.reward import RewardConfig, run_reward
from cai.train.sft import SFTConfig, run_sft

pytestmark = pytest.mark.usefixtures("one_thread")

REL = 1e-6
QUESTIONS = ["how do I bake bread?", "which is less harmful?", "can you help me?", "what is the answer?"]
GOOD = ["mix", "flour", "water", "bake", "safer", "option", "doctor"]
BAD = ["lazy", "dog", "fox", "jumps", "brown", "quick"]


def weights_pin(directory: Path) -> tuple[float, float]:
    """(position-weighted sum, sum of squares) over all tensors of directory/model.safetensors."""
    tensors = load_file(str(directory / "model.safetensors"))
    weighted, squares = 0.0, 0.0
    for k, name in enumerate(sorted(tensors)):
        w = tensors[name].double().reshape(-1)
        weighted += (k + 1) * float((w * (1 + torch.arange(w.numel()) % 7)).sum())
        squares += float((w * w).sum())
    return weighted, squares


def last_row(out: Path, split: str) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split][-1]


def assert_pinned(got: dict[str, float], pinned: dict[str, float]) -> None:
    assert got.keys() == pinned.keys()
    for k, v in pinned.items():
        assert got[k] == pytest.approx(v, rel=REL, abs=1e-9), k


def test_reward_model_run_is_pinned(tiny_model_dir, tmp_path):
    rng = random.Random(0)
    rows = [{"id": f"r{i}", "prompt": [{"role": "user", "content": rng.choice(QUESTIONS)}],
             "chosen": [{"role": "assistant", "content": " ".join(rng.choice(GOOD) for _ in range(3))}],
             "rejected": [{"role": "assistant", "content": " ".join(rng.choice(BAD) for _ in range(3))}],
             "label_prob": 1.0 if i % 2 else 0.8, "source": "human-helpful" if i % 2 else "ai-harmless"}
            for i in range(24)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    summary = run_reward(RewardConfig(
        model=str(tiny_model_dir), out_dir=str(out), train_file=str(data), test_file=str(data), lr=3e-3,
        batch_size=4, grad_accum=2, max_steps=6, warmup_steps=1, schedule="cosine", max_length=48, log_every=1,
        device="cpu", seed=3, plot=False, max_grad_norm=0.5, weight_decay=0.1))
    weighted, squares = weights_pin(out / "final")
    train, test = last_row(out, "train"), last_row(out, "eval")
    got = {"weighted": weighted, "squares": squares, "train_loss": train["loss"], "grad_norm": train["grad_norm"],
           "lr": train["lr"], "test_loss": test["loss"], "test_accuracy": test["accuracy"],
           "reward_mean": summary.reward_mean, "reward_std": summary.reward_std}
    assert_pinned(got, RM_PINS)


def test_sft_run_is_pinned(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": QUESTIONS[i % 4]}],
        "final_response": ["I cannot help with that.", "Mix flour, water, salt and yeast.", "Please ask a doctor."][i % 3],
    }) + "\n" for i in range(20)))
    out = tmp_path / "sft"
    summary = run_sft(SFTConfig(
        model=str(tiny_model_dir), out_dir=str(out), train_file=str(data), test_size=0.2, device="cpu", lr=3e-3,
        max_steps=6, batch_size=4, grad_accum=2, log_every=1, seed=1, plot=False, warmup_ratio=0.2))
    weighted, squares = weights_pin(out / "final")
    train = last_row(out, "train")
    got = {"weighted": weighted, "squares": squares, "train_loss": train["loss"], "grad_norm": train["grad_norm"],
           "tokens": train["tokens"], "test_loss_before": summary.test_loss_before,
           "test_loss_after": summary.test_loss_after}
    assert_pinned(got, SFT_PINS)


@pytest.mark.parametrize("critic", ["policy_head", "reward_model"])
def test_ppo_run_is_pinned(tiny_model_dir, tmp_path, critic):
    prompts = tmp_path / "red.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    out = tmp_path / "ppo"
    summary = run_ppo(PPOConfig(
        model=str(tiny_model_dir), out_dir=str(out), prompts=[{"file": str(prompts)}], device="cpu", seed=0,
        prompts_per_step=4, completions_per_prompt=2, max_new_tokens=8, lr=1e-3, ppo_epochs=2, batch_size=2,
        grad_accum=2, max_steps=3, critic=critic, critic_model=str(tiny_model_dir), kl_coef=0.2, sample_every=0,
        plot=False, schedule="linear", max_grad_norm=0.5),
        reward_fn=lambda convs, texts: [float(sum(ch in "0123456789 " for ch in t)) for t in texts])
    weighted, squares = weights_pin(out / "final")
    row = last_row(out, "train")
    keys = ("score", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl", "grad_norm",
            "explained_variance", "response_length", "lr")
    got = {"weighted": weighted, "squares": squares, **{k: row[k] for k in keys},
           "score_end": summary.score_end, "episodes": float(summary.episodes)}
    assert_pinned(got, PPO_PINS[critic])


# recorded on commit 714d705 (before the split of cai/train/common.py), CPU, torch 2.13. PPO_PINS
# re-recorded on purpose when a tied embedding's gradient became sparse rows added into the LM head's
# (cai.train.models.sparse_tied_embedding_grad, 670 MB less at Gemma's peak): the same sum in another
# order moved the weights pin by 1e-9 relative and the small differences kl, policy_loss, approx_kl by
# up to 3e-5; the per-pass gradients agree to float32 rounding (test_train_common). All else unchanged.
RM_PINS = {
    "weighted": 6694.029052429905, "squares": 172.7100315551102, "train_loss": 0.3429931402206421,
    "grad_norm": 3.743504285812378, "lr": 0.0, "test_loss": 0.3352069556713104, "test_accuracy": 1.0,
    "reward_mean": -1.750722885131836, "reward_std": 0.9854042530059814,
}
SFT_PINS = {
    "weighted": 6731.398894641767, "squares": 173.973540496868, "train_loss": 5.031022071838379,
    "grad_norm": 1.4759987592697144, "tokens": 109.0, "test_loss_before": 5.58537483215332,
    "test_loss_after": 5.018219470977783,
}
PPO_PINS = {
    "policy_head": {
        "weighted": 6653.588420241404, "squares": 171.01216294927355, "score": 0.25, "kl": 0.09521359205245972,
        "entropy": 5.544990539550781, "policy_loss": -0.005833327770233154, "value_loss": 0.25906822457909584,
        "clipfrac": 0.0, "approx_kl": 5.565304309129715e-05, "grad_norm": 1.9783008694648743,
        "explained_variance": -0.005460262298583984, "response_length": 8.0, "lr": 0.0, "score_end": 0.25,
        "episodes": 24.0,
    },
    "reward_model": {
        "weighted": 6653.764561258626, "squares": 171.010461624975, "score": 0.25, "kl": 0.10020673274993896,
        "entropy": 5.544987678527832, "policy_loss": -0.005877681076526642, "value_loss": 0.2170773632824421,
        "clipfrac": 0.0, "approx_kl": 5.443720147013664e-05, "grad_norm": 2.032126098871231,
        "explained_variance": -0.008823990821838379, "response_length": 8.0, "lr": 0.0, "score_end": 0.25,
        "episodes": 24.0,
    },
}
