"""PPO step cost: our PPO trainer vs TRL's RLOOTrainer (TRL has no PPO trainer any more), in one run.

Both start from the same policy and the same reward model (a `cai train rm` output, or the policy
with a fresh one-output head saved once), take the same number of prompts per step from the same
prompt file rendered the same way, sample the same number of completions per prompt at the same
temperature and max_new_tokens, use a KL coefficient of 0.05 against a frozen reference, fp32,
no gradient checkpointing, and make one optimizer step per step (ppo_epochs 1 / num_iterations 1,
one minibatch of all episodes, micro-batches of --micro). Each trainer runs in its own subprocess,
and the trainers alternate over --rounds rounds (TRL, ours, ours with LoRA, TRL, ...) so a
disturbance from other jobs hits all of them; each reports its best round (shortest step time,
highest rates; peak memory is the largest seen). `ours_lora` is our trainer with a `lora:` block
(--lora-r, all linear layers): the reference is then the adapter turned off, the critic trains
adapters; TRL's RLOOTrainer runs a full fine-tune, its default. --no-lora leaves it out. --critic-lora adds
`ours_critic_lora`: the policy trains in full and the critic is LoRA adapters on the reward model,
which then also serves as the frozen reward model (its adapters off), so the RM is held once.

What differs by design: our PPO also trains a critic (a copy of the reward model read at every
token, or with --critic policy_head a value head on the policy), which RLOO does without; and our
rollouts end at the HH format's next turn ("\n\nHuman:") as well as at EOS, TRL's only at EOS, so
response lengths differ. Generated tokens/s (tokens sampled per second of whole steps) is the
like-for-like rate; wall time per step is reported with the mean response length next to it.
The first step (allocator warm-up) is left out of every number.

Our step time is split into generation, scoring (reward model), prepare (log-probs under the
policy and the reference, values, GAE) and update (forward/backward/optimizer); TRL's into
generation (`_generate`), scoring (`_calculate_rewards`) and the rest.

    flock /tmp/cai_gemma.lock python benchmarks/bench_ppo.py --steps 4 --prompts 4 --completions 2 --max-new-tokens 32 --rounds 3

Prints a JSON report (also written to OUT/report.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _workers import device, peak_memory_mb, report_result, run_worker


def _episodes(a: argparse.Namespace) -> int:
    return a.prompts * a.completions


# ---------------------------------------------------------------- workers (one per subprocess)


def worker_ours(a: argparse.Namespace) -> dict:
    from cai.train.common import read_metrics
    from cai.train.ppo import PPOConfig, run_ppo

    out = Path(a.out) / f"{a.worker}-{a.critic}-{a.round}"
    lora = {"r": a.lora_r, "alpha": 2.0 * a.lora_r}
    adapters = {"ours-lora": {"lora": lora}, "ours-critic-lora": {"critic_lora": lora}}.get(a.worker, {})
    cfg = PPOConfig(
        model=a.model, reward_model=str(Path(a.out) / "rm"), critic=a.critic, out_dir=str(out),
        prompts=[{"file": str(Path(a.out) / "prompts.jsonl")}], prompts_per_step=a.prompts,
        completions_per_prompt=a.completions, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
        batch_size=a.micro, grad_accum=_episodes(a) // a.micro, ppo_epochs=1, max_steps=a.steps, kl_coef=0.05,
        lr=a.lr, schedule="linear", warmup_steps=0, max_grad_norm=1.0, unfinished_penalty=0.0, normalize_reward=False,
        sample_every=0, plot=False, seed=a.seed, device="auto", dtype="fp32", **adapters,
    )
    run_ppo(cfg)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"][1:]
    parts = {k: sum(r[f"time_{k}"] for r in rows) / len(rows) for k in ("generate", "score", "prepare", "update")}
    step = sum(parts.values())
    tokens = sum(r["response_length"] for r in rows) / len(rows) * _episodes(a)
    result = {"step_s": step, "tokens_per_step": tokens, "tokens_per_s": tokens / step,
              "gen_tokens_per_s": tokens / parts["generate"], "mean_response_tokens": tokens / _episodes(a),
              "breakdown_s": parts, "breakdown_share": {k: v / step for k, v in parts.items()},
              "timed_steps": len(rows), "score_mean": sum(r["score"] for r in rows) / len(rows),
              "peak_mb": peak_memory_mb()}
    shutil.rmtree(out)  # checkpoints with optimizer state: gigabytes per run
    return result


def worker_trl(a: argparse.Namespace) -> dict:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl import RLOOConfig, RLOOTrainer

    prompts = [json.loads(x)["text"] for x in (Path(a.out) / "prompts.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(a.model)
    policy = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    rm_dir = str(Path(a.out) / "rm")
    rm_tok = AutoTokenizer.from_pretrained(rm_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32)
    args = RLOOConfig(
        output_dir=str(Path(a.out) / f"trl-{a.round}"), per_device_train_batch_size=a.micro,
        gradient_accumulation_steps=_episodes(a) // a.micro, num_generations=a.completions,
        max_completion_length=a.max_new_tokens, temperature=a.temperature, beta=0.05, num_iterations=1,
        learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, max_steps=a.steps,
        logging_steps=1, save_strategy="no", report_to="none", seed=a.seed, bf16=False, gradient_checkpointing=False,
        disable_dropout=True, use_cpu=device() == "cpu", dataloader_num_workers=0, log_completions=False,
    )
    trainer = RLOOTrainer(model=policy, reward_funcs=rm, args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=tok, reward_processing_classes=rm_tok)
    spans: dict[str, list[float]] = {"generate": [], "score": []}

    def timed(name: str, fn):  # wall time of one of TRL's own methods, per call
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            spans[name].append(time.perf_counter() - t0)
            return result
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    marks: list[float] = []
    lengths: list[float] = []
    rewards: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if device() == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))
                rewards.append(float(logs.get("reward", float("nan"))))

    trainer.add_callback(Clock())
    trainer.train()
    steps = [t1 - t0 for t0, t1 in itertools.pairwise(marks)][1:]
    gen, score = spans["generate"][1:], spans["score"][1:]
    step = sum(steps) / len(steps)
    parts = {"generate": sum(gen) / len(gen), "score": sum(score) / len(score)}
    parts["rest (log-probs, update)"] = step - parts["generate"] - parts["score"]
    tokens = sum(lengths[1:]) / len(lengths[1:]) * _episodes(a)
    return {"step_s": step, "tokens_per_step": tokens, "tokens_per_s": tokens / step,
            "gen_tokens_per_s": tokens / parts["generate"], "mean_response_tokens": tokens / _episodes(a),
            "breakdown_s": parts, "breakdown_share": {k: v / step for k, v in parts.items()}, "timed_steps": len(steps),
            "score_mean": sum(rewards[1:]) / len(rewards[1:]), "peak_mb": peak_memory_mb()}


# ---------------------------------------------------------------- driver


def prepare(a: argparse.Namespace) -> dict:
    """The shared reward model (a trained one, or the policy with a fresh head) and prompt file."""
    from cai.conversation import as_dicts
    from cai.stages.inputs import load_prompts
    from cai.tokens import render_chat
    from cai.train.common import seed_everything
    from cai.train.reward import load_reward_model

    out = Path(a.out)
    seed_everything(a.seed)
    tok, rm = load_reward_model(a.reward_model or a.model)
    rm.save_pretrained(out / "rm")
    tok.save_pretrained(out / "rm")
    convs = load_prompts(a.prompt_file)
    # one file both read: `prompt` for our loader, the same conversation rendered as `text` for TRL's
    (out / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": as_dicts(c), "text": render_chat(tok, as_dicts(c))}) + "\n" for c in convs))
    return {"prompts_in_file": len(convs), "reward_model": a.reward_model or "policy + fresh head (untrained)"}


def best_round(rounds: list[dict]) -> dict:
    """The least disturbed round of one trainer: shortest step, highest rates, largest peak memory."""
    best = min(rounds, key=lambda x: x["step_s"])
    return {**best, "tokens_per_s": max(x["tokens_per_s"] for x in rounds),
            "gen_tokens_per_s": max(x["gen_tokens_per_s"] for x in rounds),
            "peak_mb": max(x["peak_mb"] for x in rounds), "rounds": rounds}


def ratios(report: dict, names: list[str]) -> dict:
    """Ours over TRL, named so the direction cannot be misread: step time and memory lower is better,
    tokens/s higher is better."""
    trl = report["trl"]
    out = {}
    for name in names[1:]:
        ours = report[name.replace("-", "_")]
        label = {"ours": "ours_full", "ours-lora": "ours_lora", "ours-critic-lora": "ours_full_critic_lora"}[name]
        out[f"{label}_step_time_over_trl_step_time (lower is better)"] = ours["step_s"] / trl["step_s"]
        out[f"{label}_tokens_per_s_over_trl_tokens_per_s (higher is better)"] = ours["tokens_per_s"] / trl["tokens_per_s"]
        out[f"{label}_generated_tokens_per_s_over_trl (higher is better)"] = ours["gen_tokens_per_s"] / trl["gen_tokens_per_s"]
        out[f"{label}_peak_memory_over_trl_peak_memory (lower is better)"] = ours["peak_mb"] / trl["peak_mb"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="policy (default: bundled Gemma 3 270M)")
    ap.add_argument("--reward-model", default=None, help="trained RM dir (default: the policy with a fresh head)")
    ap.add_argument("--prompt-file", default=str(ROOT / "examples" / "red_team_prompts.jsonl"))
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per trainer (the first is not timed)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--completions", type=int, default=2, help="completions per prompt (RLOO needs >= 2)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--micro", type=int, default=4, help="episodes per forward/backward pass")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--critic", choices=["reward_model", "policy_head"], default="reward_model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each trainer; the best round counts")
    ap.add_argument("--lora-r", type=int, default=16, help="adapter rank of the ours_lora variant")
    ap.add_argument("--no-lora", action="store_true", help="leave out the ours_lora variant")
    ap.add_argument("--critic-lora", action="store_true", help="add ours_critic_lora: the policy in full, the critic "
                    "LoRA adapters on the reward model, which it also holds (--critic reward_model)")
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--worker", choices=["ours", "ours-lora", "ours-critic-lora", "trl"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if _episodes(a) % a.micro:
        ap.error("--prompts * --completions must be a multiple of --micro")
    if a.critic_lora and a.critic != "reward_model":
        ap.error("--critic-lora needs --critic reward_model")
    if a.worker:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        result = worker_trl(a) if a.worker == "trl" else worker_ours(a)
        report_result(result)
        return 0
    if a.model is None:
        from cai.default_model import default_model_path

        a.model = str(default_model_path())
    a.out = a.out or tempfile.mkdtemp(prefix="bench_ppo-")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict = {"model": a.model, "steps": a.steps, "prompts_per_step": a.prompts,
                    "completions_per_prompt": a.completions, "max_new_tokens": a.max_new_tokens, "micro_batch": a.micro,
                    "temperature": a.temperature, "critic": a.critic, "device": device(),
                    "threads": torch.get_num_threads()}
    report.update(prepare(a))
    base = [sys.executable, __file__, "--model", a.model, "--prompt-file", a.prompt_file, "--steps", str(a.steps),
            "--prompts", str(a.prompts), "--completions", str(a.completions), "--max-new-tokens", str(a.max_new_tokens),
            "--micro", str(a.micro), "--temperature", str(a.temperature), "--lr", str(a.lr), "--critic", a.critic,
            "--seed", str(a.seed), "--out", a.out, "--lora-r", str(a.lora_r)]
    names = ["trl", "ours"] + ([] if a.no_lora else ["ours-lora"]) + (["ours-critic-lora"] if a.critic_lora else [])
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(a.rounds):
        for name in names:
            runs[name].append(run_worker(base + ["--worker", name, "--round", str(r)], name))
            print(name, r, runs[name][-1], file=sys.stderr, flush=True)
    for name, rs in runs.items():
        report[name.replace("-", "_")] = best_round(rs)
    report.update(ratios(report, names))
    report["wall_s"] = time.perf_counter() - start
    (Path(a.out) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
