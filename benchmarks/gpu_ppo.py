"""PPO at real model sizes on one GPU: step time and peak memory of a Llama-3-8B-shaped policy with
LoRA, and of a Llama-3.2-1B-shaped full fine-tune, next to what `cai train ppo --plan` predicts.

The models are random weights built from their configs (no hub access needed), with the
tokenizer of the tests' tiny models: token ids it does not know decode to nothing, which does not
matter for timing; the vocabulary, and so the LM head and the logits, keep Llama 3's 128,256
entries. The reward is rule-based (characters in the response), so the figures are those of the
policy, its reference (the adapter turned off with LoRA) and the critic (the policy_head value
head by default, or with --critic reward_model a LoRA critic on its own copy of the base).

    python benchmarks/gpu_ppo.py --shape llama8b-lora     # on a GPU with >= 80 GB
    python benchmarks/gpu_ppo.py --shape llama1b-full
    python benchmarks/gpu_ppo.py --shape tiny --device cpu  # a smoke run (tests use it)

Prints one `RESULT name value` line per figure; the first PPO step (allocator warm-up, vLLM-free
hf rollouts) is left out of the step time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {  # LlamaConfig fields; "lora" says which trainer setup the shape is benchmarked with
    "llama8b-lora": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128_256,
                     "tie_word_embeddings": False, "lora": True},
    "llama1b-full": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128_256,
                     "tie_word_embeddings": True, "lora": False},
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": True, "lora": True},
}


def build_model(shape: dict, out: Path, device: str) -> Path:
    """A random-weight Llama of `shape` saved in bf16 with the tests' tokenizer."""
    from tiny import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    fields = {k: v for k, v in shape.items() if k != "lora"}
    config = LlamaConfig(**fields, max_position_embeddings=4096, rope_theta=500_000.0, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama8b-lora")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--steps", type=int, default=3, help="PPO steps (the first is not timed)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--completions", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4, help="episodes per forward/backward pass")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--critic", choices=["policy_head", "reward_model"], default="policy_head")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--out", default=None, help="work dir (default: a temp dir)")
    a = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    from cai.train.memory_plan import GIB, model_shape, plan_ppo
    from cai.train.ppo import PPOConfig, run_ppo

    out = Path(a.out or tempfile.mkdtemp(prefix="gpu_ppo-"))
    out.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[a.shape]
    t0 = time.perf_counter()
    model = build_model(shape, out / "model", device)
    print(f"RESULT build_s {time.perf_counter() - t0:.1f}", flush=True)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}: how do I bake bread?"}) + "\n" for i in range(64)))
    episodes = a.prompts * a.completions
    config = PPOConfig(
        model=str(model), out_dir=str(out / "run"), prompts=[{"file": str(prompts)}], device=device, dtype="bf16"
        if device == "cuda" else "fp32", prompts_per_step=a.prompts, completions_per_prompt=a.completions,
        max_new_tokens=a.max_new_tokens, batch_size=a.micro, grad_accum=episodes // a.micro, ppo_epochs=1,
        max_steps=a.steps, critic=a.critic, critic_model=str(model) if a.critic == "reward_model" else None,
        lora={"r": a.lora_r, "alpha": 2.0 * a.lora_r} if shape["lora"] else None, sample_every=0, plot=False,
        gradient_checkpointing=a.gradient_checkpointing, unfinished_penalty=0.0,
    )
    policy = model_shape(model)
    gpu = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 80 * GIB
    plan = plan_ppo(config, policy, policy if a.critic == "reward_model" else None, None, 1, gpu)
    print(f"RESULT params {policy.params}", flush=True)
    print(f"RESULT plan_total_gib {plan.total / GIB:.2f}", flush=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    summary = run_ppo(config, reward_fn=lambda convs, texts: [len(t) / 100.0 for t in texts], progress=False)
    logged = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = logged[1:] or logged
    step = sum(sum(r[f"time_{k}"] for k in ("generate", "score", "prepare", "update")) for r in rows) / len(rows)
    print(f"RESULT step_s {step:.2f}")
    print(f"RESULT update_share {sum(r['time_update'] for r in rows) / len(rows) / step:.2f}")
    print(f"RESULT gen_tokens_per_s {sum(r['gen_tokens_per_s'] for r in rows) / len(rows):.1f}")
    print(f"RESULT episodes {summary.episodes}")
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        print(f"RESULT peak_gib {peak / GIB:.2f}")
        print(f"RESULT peak_over_plan {peak / plan.total:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
