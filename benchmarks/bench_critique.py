"""Critique-revise throughput on the default model: stage vs raw `model.generate`, batching, prefix reuse.

    flock /tmp/cai_gemma.lock python benchmarks/bench_critique.py            # ~3-4 minutes on 2 CPU cores

All runs process the same `--batch-size` red-team prompts with the same constitution, principles,
sampling settings and per-row seeds, on one loaded model (the bundled Gemma 3 270M by default):

- "stage": `cai generate`'s code path (`run_critique`) with the hf engine, once with shared-prefix KV
  reuse off and once on (the default). Every engine call it makes is recorded.
- "raw model.generate": baseline for (a). The stage's recorded calls replayed with plain
  `model.generate` on the same token ids, batch size and sampling settings, each call generating
  exactly as many tokens as that call's longest row (`min_new_tokens` = `max_new_tokens`), which is
  how long a static `generate` batch runs. Its tokens/s counts the same tokens the stage kept; the
  line "strict" counts every token `generate` produced (B x longest), an upper bound on raw speed.
- "one prompt at a time": baseline for (b). The stage with one prompt per batch (engine batch 1).

Prints (a) stage tokens/s / raw model.generate tokens/s (goal >= 0.85), (b) batched vs one prompt at
a time, (c) prefix reuse on vs off (whole stage and critique+revision calls only); each as a tokens/s
ratio and as a wall-time ratio (sampled runs can differ in length: rows are seeded per row, but in
bfloat16 rounding differences between batch shapes change a token now and then, and a sampled row
goes its own way from there). Last, greedy agreement on the critique prompts: reuse vs no reuse,
and, as the bfloat16 noise floor, each prompt alone vs batched (both without reuse).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from cai.engines.base import Generation, SamplingConfig
from cai.engines.hf import HFEngine
from cai.errors import CaiError
from cai.records import SFTRecord
from cai.stages.critique import CritiqueConfig, run_critique
from cai.store import read_records
from cai.tokens import left_pad


class Recorder:
    """Wraps an engine; keeps every generate call's prompts, sampling, results and wall time."""

    def __init__(self, engine: HFEngine):
        self.engine = engine
        self.name, self.model_id = engine.name, engine.model_id
        self.calls: list[dict[str, Any]] = []

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return self.engine.stop_sequences

    def render_chat(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
        return self.engine.render_chat(messages, assistant_prefix)

    def choice_logprobs(self, prompts: list[str], choices: list[list[str]]) -> list[list[float]]:
        return self.engine.choice_logprobs(prompts, choices)

    def generate(self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None) -> list[Generation]:
        start = time.perf_counter()
        out = self.engine.generate(prompts, sampling, seeds=seeds)
        kind = "initial" if prompts[0].rstrip().endswith("Assistant:") else \
            "critique" if prompts[0].rstrip().endswith("Critique:") else "revision"
        self.calls.append({"kind": kind, "prompts": prompts, "sampling": sampling, "seconds": time.perf_counter() - start,
                           "lengths": [g.completion_tokens for g in out]})
        return out


def run_stage(engine: HFEngine, config: CritiqueConfig, out_dir: Path, label: str) -> dict[str, Any]:
    """One stage run into a fresh file: wall seconds, tokens, recorded calls, final responses."""
    recorder = Recorder(engine)
    cfg = config.model_copy(update={"out": out_dir / f"{label}.jsonl"})
    start = time.perf_counter()
    summary = run_critique(cfg, engine=recorder, progress=False)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    rows = sorted(read_records(cfg.out, SFTRecord), key=lambda r: r.source_index)
    return {"seconds": seconds, "tokens": summary.generated_tokens, "calls": recorder.calls,
            "finals": [r.final_response for r in rows], "steps": [[s.critique for s in r.steps] for r in rows]}


@torch.inference_mode()
def replay_raw(engine: HFEngine, calls: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """The recorded calls through plain `model.generate`: same ids, batch, sampling, per-call length."""
    model, tok = engine.model, engine.tokenizer
    torch.manual_seed(seed)
    seconds, produced = 0.0, 0
    for call in calls:
        s: SamplingConfig = call["sampling"]
        length = max(call["lengths"])
        ids, mask = left_pad([engine.encode(p) for p in call["prompts"]], tok.pad_token_id, engine.device)
        sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0} \
            if s.temperature > 0 else {"do_sample": False}
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=length, min_new_tokens=length,
                             pad_token_id=tok.pad_token_id, **sampling)
        seconds += time.perf_counter() - start
        produced += (out.shape[1] - ids.shape[1]) * out.shape[0]
    return {"seconds": seconds, "produced": produced}


def greedy_agreement(engine: HFEngine, prompts: list[str], tokens: int) -> dict[str, int]:
    """Rows with identical greedy text: reuse vs plain, and alone vs batched (both plain)."""
    greedy = SamplingConfig(temperature=0, max_new_tokens=tokens)
    engine.prefix_cache = True
    reuse = engine.generate(prompts, greedy)
    engine.prefix_cache = False
    plain = engine.generate(prompts, greedy)
    batch, engine.batch_size = engine.batch_size, 1
    alone = engine.generate(prompts, greedy)
    engine.batch_size, engine.prefix_cache = batch, True
    return {"rows": len(prompts), "tokens": tokens,
            "reuse_vs_plain": sum(a.text == b.text for a, b in zip(reuse, plain)),
            "alone_vs_batched": sum(a.text == b.text for a, b in zip(alone, plain))}


def by_kind(calls: list[dict[str, Any]]) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for c in calls:
        total[c["kind"]] += c["seconds"]
    return dict(total)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the bundled Gemma 3 270M")
    ap.add_argument("--prompts", default="examples/red_team_prompts.jsonl")
    ap.add_argument("--constitution", default="constitutions/harmless.yaml")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts (= rows per batch) (default 8)")
    ap.add_argument("--rounds", type=int, default=1, help="critique-revise rounds (default 1)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="initial responses and revisions (default 64)")
    ap.add_argument("--critique-max-new-tokens", type=int, default=48, help="(default 48)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--dtype", default="auto", help="engine dtype (default auto: bfloat16 on CPUs with AVX512-BF16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-sequential", action="store_true", help="skip the one-prompt-at-a-time run, (b)")
    ap.add_argument("--agree-tokens", type=int, default=24, help="greedy tokens per row for the agreement "
                    "check (0 = skip it; default 24)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    try:
        from cai.engines import load_engine

        start = time.perf_counter()
        engine = load_engine("hf", args.model, batch_size=args.batch_size, dtype=args.dtype)
        load_s = time.perf_counter() - start
    except CaiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    assert isinstance(engine, HFEngine)
    config = CritiqueConfig(
        prompts=Path(args.prompts), constitution=Path(args.constitution), out=Path("unused.jsonl"),
        rounds=args.rounds, max_new_tokens=args.max_new_tokens, critique_max_new_tokens=args.critique_max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed, limit=args.batch_size,
    )
    engine.generate(["\n\nHuman: Hi\n\nAssistant:"], SamplingConfig(max_new_tokens=2))  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        engine.prefix_cache = False
        plain = run_stage(engine, config, out, "plain")
        raw = replay_raw(engine, plain["calls"], args.seed)
        engine.prefix_cache = True
        reuse = run_stage(engine, config, out, "reuse")
        seq = None
        if not args.skip_sequential:
            engine.batch_size = 1
            seq = run_stage(engine, config.model_copy(update={"batch_size": 1}), out, "sequential")
            engine.batch_size = args.batch_size
    agree = greedy_agreement(engine, [p for c in reuse["calls"] if c["kind"] == "critique" for p in c["prompts"]],
                             args.agree_tokens) if args.agree_tokens else None

    def rate(run: dict[str, Any]) -> float:
        return run["tokens"] / run["seconds"]

    raw_rate = plain["tokens"] / raw["seconds"]
    strict_rate = raw["produced"] / raw["seconds"]
    prompt_lens = [len(engine.encode(p)) for c in plain["calls"] if c["kind"] == "critique" for p in c["prompts"]]
    kinds_plain, kinds_reuse = by_kind(plain["calls"]), by_kind(reuse["calls"])
    cr_plain = kinds_plain.get("critique", 0) + kinds_plain.get("revision", 0)
    cr_reuse = kinds_reuse.get("critique", 0) + kinds_reuse.get("revision", 0)
    results: dict[str, Any] = {
        "model": engine.model_id, "dtype": str(engine.model.dtype), "threads": torch.get_num_threads(),
        "load_seconds": round(load_s, 2), "rows": args.batch_size, "rounds": args.rounds,
        "max_new_tokens": args.max_new_tokens, "critique_max_new_tokens": args.critique_max_new_tokens,
        "critique_prompt_tokens": [min(prompt_lens), max(prompt_lens)],
        "stage_plain": {"seconds": plain["seconds"], "tokens": plain["tokens"], "by_kind": kinds_plain},
        "stage_reuse": {"seconds": reuse["seconds"], "tokens": reuse["tokens"], "by_kind": kinds_reuse},
        "raw_generate": raw,
        "a_stage_vs_raw": rate(plain) / raw_rate,
        "a_stage_vs_raw_time": raw["seconds"] / plain["seconds"],
        "a_stage_vs_raw_strict": rate(plain) / strict_rate,
        "a_stage_with_reuse_vs_raw": rate(reuse) / raw_rate,
        "c_reuse_vs_plain_stage": rate(reuse) / rate(plain),
        "c_reuse_vs_plain_stage_time": plain["seconds"] / reuse["seconds"],
        "c_reuse_vs_plain_critique_revision_calls": cr_plain / cr_reuse,
        "identical_rows_reuse_vs_plain": sum(a == b for a, b in zip(plain["finals"], reuse["finals"])),
        "greedy_agreement": agree,
    }
    if seq is not None:
        results["stage_sequential"] = {"seconds": seq["seconds"], "tokens": seq["tokens"], "by_kind": by_kind(seq["calls"])}
        results["b_batched_vs_sequential"] = rate(plain) / rate(seq)
        results["b_batched_vs_sequential_time"] = seq["seconds"] / plain["seconds"]
        results["b_batched_with_reuse_vs_sequential"] = rate(reuse) / rate(seq)
        results["identical_rows_sequential_vs_plain"] = sum(a == b for a, b in zip(plain["finals"], seq["finals"]))

    n = args.batch_size
    print(f"\n{n} red-team prompts x {args.rounds} round(s), {engine.model_id}, {results['dtype']}, "
          f"{results['threads']} threads; critique prompts {prompt_lens and min(prompt_lens)}-{max(prompt_lens)} tokens; "
          f"max_new_tokens {args.max_new_tokens}/{args.critique_max_new_tokens} (critique)")
    line = "{:52s} {:>9}"
    print(line.format("run", "tokens/s") + "   seconds  tokens")
    for name, run in [("stage, prefix reuse off", plain), ("stage, prefix reuse on (default)", reuse)] + (
            [("stage, one prompt at a time", seq)] if seq else []):
        print(line.format(name, f"{rate(run):.1f}") + f"  {run['seconds']:8.1f}  {run['tokens']:6d}")
    print(line.format("raw model.generate, same calls (stage's tokens)", f"{raw_rate:.1f}") + f"  {raw['seconds']:8.1f}")
    print(line.format("raw model.generate, strict (B x longest tokens)", f"{strict_rate:.1f}")
          + f"  {raw['seconds']:8.1f}  {raw['produced']:6d}")
    print()
    print(line.format("(a) stage / raw model.generate (reuse off)", f"{results['a_stage_vs_raw']:.2f}")
          + f"   goal >= 0.85 (wall-time ratio {results['a_stage_vs_raw_time']:.2f})")
    print(line.format("    same, strict raw count", f"{results['a_stage_vs_raw_strict']:.2f}"))
    print(line.format("    stage with reuse (default) / raw", f"{results['a_stage_with_reuse_vs_raw']:.2f}"))
    if seq is not None:
        print(line.format("(b) batched / one prompt at a time (reuse off)", f"{results['b_batched_vs_sequential']:.2f}x")
              + f"   (wall-time ratio {results['b_batched_vs_sequential_time']:.2f}x)")
        print(line.format("    batched with reuse / one prompt at a time", f"{results['b_batched_with_reuse_vs_sequential']:.2f}x"))
    print(line.format("(c) prefix reuse on / off, whole stage", f"{results['c_reuse_vs_plain_stage']:.2f}x")
          + f"   (wall-time ratio {results['c_reuse_vs_plain_stage_time']:.2f}x)")
    print(line.format("    critique + revision calls only", f"{results['c_reuse_vs_plain_critique_revision_calls']:.2f}x"))
    same = f"{results['identical_rows_reuse_vs_plain']}/{n} reuse vs off"
    if seq is not None:
        same += f", {results['identical_rows_sequential_vs_plain']}/{n} one-at-a-time vs batched"
    print(line.format("identical sampled final responses", "") + f"  {same}")
    if agree:
        print(line.format(f"identical greedy critiques ({agree['tokens']} tokens)", "")
              + f"  {agree['reuse_vs_plain']}/{agree['rows']} reuse vs off, "
              f"{agree['alone_vs_batched']}/{agree['rows']} alone vs batched (bf16 noise floor)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
