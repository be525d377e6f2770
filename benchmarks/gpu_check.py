"""GPU check: the figures that say whether cai's engines and trainers use a GPU well, in one run.

Needs only torch and transformers (plus cai itself); no hub access: every model is built with random
weights from a config shaped like a real one (Gemma 3 1B, Llama 3 8B; `--tiny`: tiny configs of the
same architectures) and a small tokenizer trained here. Random weights cost the same FLOPs as real
ones; they never emit EOS, so every row generates exactly max_new_tokens (equal work on both sides of
each ratio). Budget: under 8 minutes on one H100/H200-class GPU; `--device cpu --tiny` runs in
seconds (a test runs it so the script cannot rot).

Prints one line per figure, `RESULT name value`:
- gen_tok_s_<shape>_{hf,raw}, gen_ratio_<shape>: our hf engine's generated tokens/s vs plain
  `model.generate` (greedy, same prompts, same batch size); ratio = ours / raw.
- choice_pairs_s_<shape>: `choice_logprobs` on label-style prompts, two one-token choices, pairs/s.
- rm_samples_s, rm_peak_mb: `run_reward` (the trainer's public entry point) on the Gemma-1B shape,
  preference pairs per second as the trainer logs it; peak GPU memory (CPU: peak RSS).
- ppo_step_s, ppo_peak_mb: `run_ppo` on the Gemma-1B shape (policy_head critic, a few short
  steps: a small figure of the step's cost, not a tuned run).
- with vllm importable: vllm_tok_s_{ours,bare}, vllm_ratio: our vLLM engine's generate vs bare
  `vllm.LLM.generate` on the same LLM and token prompts (goal >= 0.9).

    python benchmarks/gpu_check.py                    # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Real shapes (public configs) and tiny ones of the same architectures.
SHAPES: dict[str, dict[str, Any]] = {
    "gemma1b": {"arch": "gemma3", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
                "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
                "sliding_window": 512, "max_position_embeddings": 32768},
    "llama8b": {"arch": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                "max_position_embeddings": 8192},
}
TINY: dict[str, dict[str, Any]] = {
    "gemma1b": {"arch": "gemma3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 512,
                "sliding_window": 16, "max_position_embeddings": 1024},
    "llama8b": {"arch": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024},
}
# (prompts, prompt words, new tokens, batch size) for the generation figure; label prompts for scoring
FULL_SIZES = {"gen": (64, 96, 128, 64), "choice": (256, 200), "rm_steps": 8, "ppo_steps": 3}
TINY_SIZES = {"gen": (6, 12, 8, 3), "choice": (6, 20), "rm_steps": 3, "ppo_steps": 2}
CORPUS = (
    "Human: how do I bake bread? Assistant: Mix flour, water, salt and yeast, then knead and bake. "
    "Critique: the response is helpful and harmless. Revision: the response stays the same. "
    "Which of these responses is less harmful? (A) first (B) second. The answer is (A) or (B). "
    "I cannot help with that, but here is a safer option. Please ask a doctor or a friend. "
)


def result(name: str, value: float) -> None:
    print(f"RESULT {name} {value:.4g}", flush=True)


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained on a few sentences (ids < 1024 fit every shape's vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 8, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def build_model(shape: dict[str, Any], tok: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A random-weight causal LM of `shape`, created directly on `device` in `dtype`."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in shape.items() if k != "arch"}
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if shape["arch"] == "gemma3":
        layers = shape["num_hidden_layers"]
        kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
        config, cls = Gemma3TextConfig(**fields, **ids, layer_types=kinds), Gemma3ForCausalLM
    else:
        config, cls = LlamaConfig(**fields, **ids, tie_word_embeddings=False), LlamaForCausalLM
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def prompts(n: int, words: int, tag: str = "") -> list[str]:
    base = CORPUS.split()
    return [f"{tag}{i}: " + " ".join(base[(i + k) % len(base)] for k in range(words)) for i in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def timed(device: torch.device) -> Iterator[list[float]]:
    out: list[float] = []
    sync(device)
    start = time.perf_counter()
    yield out
    sync(device)
    out.append(time.perf_counter() - start)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- figures


def generation_figures(name: str, engine: Any, sizes: dict[str, Any], device: torch.device) -> None:
    """Our engine vs model.generate on the same prompts and batch size, greedy, fixed length."""
    from cai.engines.base import SamplingConfig
    from cai.tokens import encode_prompt, left_pad

    n, words, new, batch = sizes["gen"]
    texts = prompts(n, words)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=new)
    engine.generate(texts[:batch], sampling.model_copy(update={"max_new_tokens": 2}))  # warm-up
    with timed(device) as t:
        ours = sum(g.completion_tokens for g in engine.generate(texts, sampling))
    model, tok = engine.model, engine.tokenizer
    rows = [encode_prompt(tok, p) for p in texts]
    raw = 0
    with timed(device) as r, torch.inference_mode():
        for b in range(0, n, batch):
            ids, mask = left_pad(rows[b:b + batch], tok.pad_token_id, device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            raw += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    result(f"gen_tok_s_{name}_hf", ours / t[0])
    result(f"gen_tok_s_{name}_raw", raw / r[0])
    result(f"gen_ratio_{name}", (ours / t[0]) / (raw / r[0]))


def choice_figure(name: str, engine: Any, sizes: dict[str, Any], device: torch.device) -> None:
    n, words = sizes["choice"]
    texts = [p + " The answer is (" for p in prompts(n, words, "Which is less harmful? ")]
    engine.choice_logprobs(texts[:2], [["A", "B"]] * 2)  # warm-up
    with timed(device) as t:
        engine.choice_logprobs(texts, [["A", "B"]] * n)
    result(f"choice_pairs_s_{name}", n / t[0])


def save_model(shape: dict[str, Any], tok: Any, device: torch.device, dtype: torch.dtype, out: Path) -> Path:
    model = build_model(shape, tok, device, dtype)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return out


def train_rows(workdir: Path, n: int) -> tuple[Path, Path]:
    """A preference file (mix's row format) and a prompt file for the trainers."""
    texts = prompts(n, 24)
    def msg(role: str, text: str) -> list[dict[str, str]]:
        return [{"role": role, "content": text}]

    pairs = [{"id": f"p{i}", "prompt": msg("user", t), "chosen": msg("assistant", texts[(i + 1) % n]),
              "rejected": msg("assistant", texts[(i + 2) % n]), "label_prob": 0.8, "source": "check"}
             for i, t in enumerate(texts)]
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (workdir / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return workdir / "pairs.jsonl", workdir / "prompts.jsonl"


def train_metrics(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == "train"]


def rm_figures(model_dir: Path, pairs: Path, steps: int, dtype: str, device: torch.device, workdir: Path) -> None:
    from cai.train.reward import RewardConfig, run_reward

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = workdir / "rm"
    run_reward(RewardConfig(model=str(model_dir), out_dir=str(out), train_file=str(pairs), max_length=256,
                            batch_size=4, max_steps=steps, lr=1e-5, warmup_steps=0, dtype=dtype, log_every=1,
                            plot=False, device=device.type))
    rates = [r["samples_per_s"] for r in train_metrics(out) if "samples_per_s" in r][1:]  # first: warm-up
    result("rm_samples_s", sum(rates) / max(len(rates), 1))
    result("rm_peak_mb", peak_mb(device))


def ppo_figures(model_dir: Path, prompt_file: Path, steps: int, dtype: str, device: torch.device,
                workdir: Path) -> None:
    from cai.train.ppo import PPOConfig, run_ppo

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = workdir / "ppo"
    run_ppo(PPOConfig(model=str(model_dir), reward_model=str(workdir / "rm" / "final"), critic="policy_head",
                      out_dir=str(out), prompts=[{"file": str(prompt_file)}], prompts_per_step=8,
                      max_new_tokens=32, batch_size=4, grad_accum=2, ppo_epochs=1, max_steps=steps,
                      normalize_reward=False, sample_every=0, plot=False, seed=0, device=device.type, dtype=dtype))
    rows = train_metrics(out)[1:] or train_metrics(out)
    step = [sum(r[f"time_{k}"] for k in ("generate", "score", "prepare", "update")) for r in rows]
    result("ppo_step_s", sum(step) / len(step))
    result("ppo_peak_mb", peak_mb(device))


def vllm_figures(model_dir: Path, sizes: dict[str, Any]) -> None:
    """Our engine vs bare LLM.generate on the same LLM and token prompts (one engine, no second share)."""
    import vllm

    from cai.engines.base import SamplingConfig
    from cai.engines.vllm import VLLMEngine
    from cai.tokens import encode_prompt

    n, words, new, _ = sizes["gen"]
    n *= 4
    texts = prompts(n, words)
    engine = VLLMEngine(model_dir, gpu_memory_utilization=0.5, max_model_len=4096)
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=new, seed=0)
    engine.generate(texts[:4], sampling)  # warm-up
    start = time.perf_counter()
    ours = sum(g.completion_tokens for g in engine.generate(texts, sampling))
    ours_s = time.perf_counter() - start
    token_prompts = [{"prompt_token_ids": encode_prompt(engine.tokenizer, p)} for p in texts]
    params = [vllm.SamplingParams(n=1, temperature=0.7, max_tokens=new, seed=i) for i in range(n)]
    start = time.perf_counter()
    bare = sum(len(r.outputs[0].token_ids) for r in engine.llm.generate(token_prompts, params, use_tqdm=False))
    bare_s = time.perf_counter() - start
    result("vllm_tok_s_ours", ours / ours_s)
    result("vllm_tok_s_bare", bare / bare_s)
    result("vllm_ratio", (ours / ours_s) / (bare / bare_s))
    engine.close()


def engine_figures(name: str, shape: dict[str, Any], tok: Any, sizes: dict[str, Any], device: torch.device,
                   dtype: torch.dtype, skip: list[str]) -> bool:
    """Generation and scoring figures of one model shape on our hf engine (the model lives in memory)."""
    from cai.engines.hf import HFEngine

    engine = HFEngine.from_loaded(tok, build_model(shape, tok, device, dtype), f"random-{name}",
                                  batch_size=sizes["gen"][3])
    ok = True
    if "gen" not in skip:
        ok &= run_step(f"gen_{name}", lambda: generation_figures(name, engine, sizes, device))
    if "choice" not in skip:
        ok &= run_step(f"choice_{name}", lambda: choice_figure(name, engine, sizes, device))
    return ok


def run_step(name: str, fn: Callable[[], None]) -> bool:
    """Run one figure; a failure prints `RESULT <name>_failed 1` and the error, and the others still run."""
    start = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a check script reports every figure it can
        print(f"{name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        result(f"{name}_failed", 1)
        return False
    print(f"# {name}: {time.perf_counter() - start:.1f}s", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures (seconds)")
    ap.add_argument("--skip", action="append", default=[], help="figure group to skip: gen, choice, rm, ppo, vllm")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    train_dtype = "bf16" if device.type == "cuda" else "fp32"
    shapes, sizes = (TINY, TINY_SIZES) if a.tiny else (SHAPES, FULL_SIZES)
    if device.type == "cpu":
        torch.set_num_threads(1)
    tok = build_tokenizer()
    ok = True
    for name, shape in shapes.items():
        ok &= engine_figures(name, shape, tok, sizes, device, dtype, a.skip)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = save_model(shapes["gemma1b"], tok, device, dtype, workdir / "gemma1b")
        pairs, prompt_file = train_rows(workdir, 32)
        if "rm" not in a.skip:
            ok &= run_step("rm", lambda: rm_figures(model_dir, pairs, sizes["rm_steps"], train_dtype, device, workdir))
        if "ppo" not in a.skip and (workdir / "rm" / "final").exists():
            ok &= run_step("ppo", lambda: ppo_figures(model_dir, prompt_file, sizes["ppo_steps"], train_dtype,
                                                      device, workdir))
        if "vllm" not in a.skip and device.type == "cuda":
            try:
                import vllm  # noqa: F401
            except ImportError:
                print("# vllm not importable: no vLLM figures", flush=True)
            else:
                ok &= run_step("vllm", lambda: vllm_figures(model_dir, sizes))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
