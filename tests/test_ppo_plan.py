"""`cai train ppo CONFIG --plan`: the memory arithmetic on two known configurations, computed by
hand here, and the command on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cai.cli import main
from cai.errors import CaiError
from cai.train.memory_plan import GIB, ModelShape, model_shape, plan_ppo
from cai.train.ppo import PPOConfig


def llama(params: int, hidden: int, layers: int, vocab: int, mlp: int, kv: int) -> ModelShape:
    per_layer = [("q_proj", hidden, hidden), ("k_proj", hidden, kv), ("v_proj", hidden, kv), ("o_proj", hidden, hidden),
                 ("gate_proj", hidden, mlp), ("up_proj", hidden, mlp), ("down_proj", mlp, hidden)]
    linears = [(f"model.layers.{i}.{n}", a, b) for i in range(layers) for n, a, b in per_layer]
    return ModelShape(params=params, hidden=hidden, layers=layers, vocab=vocab, output_head="lm_head",
                      linears=linears + [("lm_head", hidden, vocab)])


LLAMA_7B = llama(6_738_415_616, 4096, 32, 32_000, 11_008, 4096)
LLAMA_1B = llama(1_235_814_400, 2048, 16, 128_256, 8192, 512)


def _config(**kw) -> PPOConfig:
    return PPOConfig(out_dir="unused", prompts=[{"file": "unused.jsonl"}], batch_size=4, grad_accum=2,
                     max_prompt_tokens=256, max_new_tokens=64, **kw)


def test_7b_lora_with_vllm_fits_a_80_gib_gpu():
    config = _config(lora={"r": 16}, critic="policy_head", rollout_engine="vllm", dtype="bf16",
                     gradient_checkpointing=True)
    plan = plan_ppo(config, LLAMA_7B, None, LLAMA_7B, world_size=8, gpu_bytes=80 * GIB)
    # adapters r * (in + out): 4 attention projections 4096 -> 4096, 3 MLP projections 4096 <-> 11008, 32 layers
    adapters = 32 * (4 * 16 * (4096 + 4096) + 3 * 16 * (4096 + 11008))
    assert adapters == 39_976_960
    trainable = adapters + 4096 + 1  # + the value head on the policy
    frozen = 2 * 6_738_415_616  # the policy's base and the reward model; no reference copy
    assert (plan.trainable_params, plan.frozen_params) == (trainable, frozen)
    assert plan.weights == 4 * trainable + 2 * frozen
    assert (plan.grads, plan.optimizer) == (4 * trainable, 8 * trainable)
    assert plan.vllm == int(0.3 * 80 * GIB)
    tokens = 4 * (256 + 64)
    checkpointed = tokens * 4096 * 32 * 2 + tokens * 4096 * 34  # layer inputs in bf16 + one layer recomputed
    logits = 4 * 64 * 32_000 * 4 * 2
    assert plan.activations == checkpointed + logits
    assert plan.total == 53_942_501_392 and plan.fits  # about 50.2 GiB
    assert "warning" not in plan.render()


def test_1b_full_fine_tune_in_fp32_does_not_fit_a_24_gib_gpu():
    config = _config(critic="reward_model", dtype="fp32")
    plan = plan_ppo(config, LLAMA_1B, LLAMA_1B, LLAMA_1B, world_size=1, gpu_bytes=24 * GIB)
    p = 1_235_814_400
    assert (plan.trainable_params, plan.frozen_params) == (2 * p, 2 * p)  # policy + critic; reference + RM
    assert plan.weights == 4 * 2 * p + 2 * 2 * p
    assert (plan.grads, plan.optimizer, plan.vllm) == (4 * 2 * p, 8 * 2 * p, 0)
    tokens = 4 * (256 + 64)
    per_model = tokens * 2048 * 34 * 2 * 16  # fp32: twice the 2-byte figure, every layer kept
    assert plan.activations == 2 * per_model + 4 * 64 * 128_256 * 4 * 2
    assert plan.total == 50_456_240_128 and not plan.fits  # about 47.0 GiB
    assert "will not fit" in plan.render() and "lora" in plan.render()


def test_7b_full_fine_tune_fits_80_gib_gpus_under_fsdp_and_not_under_ddp():
    config = _config(critic="reward_model", rollout_engine="vllm", dtype="bf16", gradient_checkpointing=True)
    plan = plan_ppo(config, LLAMA_7B, LLAMA_7B, LLAMA_7B, world_size=8, gpu_bytes=80 * GIB, sharded=True)
    p = 6_738_415_616
    held = 2 * p // 8  # policy + critic, split over 8 GPUs (divides evenly here)
    assert held == 1_684_603_904
    assert plan.weights == 4 * held + 2 * (2 * p)  # the reference and the reward model stay whole (bf16)
    assert (plan.grads, plan.optimizer) == (4 * held, 8 * held)
    assert plan.gathered == p // 32 * 2  # one of 32 layers' share of the policy, bf16, at a time (vLLM rollouts)
    assert plan.total == 81_191_420_160 and plan.fits  # about 75.6 GiB
    assert "FSDP" in plan.render() and "gathered (FSDP)" in plan.render()
    ddp = plan_ppo(config, LLAMA_7B, LLAMA_7B, LLAMA_7B, world_size=8, gpu_bytes=80 * GIB)
    assert ddp.weights - plan.weights == 4 * (2 * p - held) and not ddp.fits
    # hf rollouts gather the whole policy at the trainer's precision; the split rounds up
    hf = plan_ppo(_config(critic="policy_head", dtype="fp32"), LLAMA_1B, None, None, world_size=3,
                  gpu_bytes=80 * GIB, sharded=True)
    trainable = 1_235_814_400 + 2048 + 1
    assert hf.grads == 4 * -(-trainable // 3) and hf.gathered == 4 * 1_235_814_400


def test_a_lora_critic_loaded_from_the_reward_model_counts_the_reward_model_once():
    """A full fine-tune of the policy with a LoRA critic: the critic's frozen base is the reward model."""
    p = 1_235_814_400
    config = _config(critic="reward_model", reward_model="rm", critic_lora={"r": 16}, dtype="fp32")
    plan = plan_ppo(config, LLAMA_1B, LLAMA_1B, LLAMA_1B, world_size=1, gpu_bytes=80 * GIB)
    # 16 layers of adapters r * (in + out): q, o 2048 -> 2048; k, v 2048 -> 512; gate, up, down 2048 <-> 8192
    adapters = 16 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 512) + 3 * (2048 + 8192))
    assert (plan.trainable_params, plan.frozen_params) == (p + adapters + 2048 + 1, 2 * p)  # reference + RM
    elsewhere = plan_ppo(_config(critic="reward_model", reward_model="rm", critic_model="other", critic_lora={"r": 16},
                                 dtype="fp32"), LLAMA_1B, LLAMA_1B, LLAMA_1B, world_size=1, gpu_bytes=80 * GIB)
    assert elsewhere.frozen_params == 3 * p  # a critic from another model: its base and the RM apart
    with pytest.raises(ValueError, match="critic_lora is for critic: reward_model"):
        _config(critic="policy_head", critic_lora={"r": 16})


def test_lora_is_not_planned_under_fsdp():
    with pytest.raises(CaiError, match="not under FSDP"):
        plan_ppo(_config(lora={"r": 8}, critic="policy_head"), LLAMA_1B, None, None, 2, 80 * GIB, sharded=True)


def test_plan_command_reads_only_configs_and_trains_nothing(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    cfg = tmp_path / "ppo.yaml"
    out = tmp_path / "out"
    cfg.write_text(f"model: {tiny_model_dir}\nout_dir: {out}\nprompts: [{{file: {prompts}}}]\ncritic: policy_head\n"
                   "lora: {r: 4}\n")
    assert main(["train", "ppo", str(cfg), "--plan", "--world-size", "2", "--gpu-memory", "1"]) == 0
    text = capsys.readouterr().out
    assert "memory plan per GPU (2 processes, DDP" in text and "activations" in text and "warning" not in text
    cfg.write_text(cfg.read_text().replace("lora: {r: 4}\n", ""))
    assert main(["train", "ppo", str(cfg), "--plan", "--world-size", "2", "--gpu-memory", "1", "--fsdp"]) == 0
    assert "memory plan per GPU (2 processes, FSDP" in capsys.readouterr().out
    assert not out.exists()
    shape = model_shape(tiny_model_dir)
    assert shape.params == sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM
                               .from_pretrained(tiny_model_dir).parameters())


def test_plan_of_a_missing_model_is_one_paragraph(tmp_path, capsys):
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(f"model: {tmp_path / 'nowhere'}\nout_dir: {tmp_path / 'o'}\nprompts: [{{file: p.jsonl}}]\n"
                   "critic: policy_head\n")
    assert main(["train", "ppo", str(cfg), "--plan"]) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_gpu_ppo_benchmark_runs_on_a_tiny_shape(tmp_path, repo_root):
    """benchmarks/gpu_ppo.py (the 8B LoRA / 1B full measurements for a GPU) on a tiny shape on CPU, so it
    cannot rot before a GPU is at hand."""
    proc = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "gpu_ppo.py"), "--shape", "tiny",
                           "--device", "cpu", "--steps", "2", "--prompts", "2", "--max-new-tokens", "4", "--micro", "2",
                           "--out", str(tmp_path)], check=False, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    assert {"params", "plan_total_gib", "step_s", "gen_tokens_per_s", "episodes"} <= set(results)
    assert int(results["episodes"]) == 8
