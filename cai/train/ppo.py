"""PPO for language models against a frozen reward model: the RL-CAI step.

CleanRL reading order: `run_ppo` is the loop, and each of its phases is one function below it, in
the order a step runs them: `setup` (models, prompts, the shared training session, resume), then
per step 1 `rollout`, 2 `score`, 3 `prepare` (old log-probs, reference log-probs, values,
KL-penalised rewards, GAE), 4 `update` (PPO epochs over minibatches), 5 `record` (statistics, log,
samples, checkpoint); `finish` writes final/ and the summary. The config lives in ppo_config.py,
the models around the policy in ppo_models.py, the prompt mix in ppo_prompts.py, and the tensor
arithmetic (GAE, losses, whitening, the KL controller) in ppo_core.py, where each piece is tested
against a hand computation. The optimizer step, checkpoints and resume are the training core's
(cai.train.loop), shared with the reward and SFT trainers.

The implementation details that matter (Huang et al., "The N+ implementation details of RLHF with
PPO"; Ziegler et al. 2019), and where they are:
- four models: the policy (from the SFT model), a frozen reference copy of it, a critic (initialised
  from the reward model and read at every token, or a zero-initialised value head on the policy's
  last hidden state) and the frozen reward model. Dropout is off in all of them. With LoRA the
  reference is the policy's adapter turned off, and a LoRA critic loaded from the reward model is
  also the reward model (its adapters off), so each of those weights is held once.
- rollouts sample at `temperature` (no top-p: the log-probs PPO recomputes must be those of the
  distribution that was sampled), with exact token ids, from the in-memory policy (rollout_engine
  hf) or from a vLLM engine in the same process whose weights are overwritten with the policy's
  before every rollout (rollout_engine vllm, GPUs); a response ends at an end token or a stop
  sequence (the HH format's next turn). Responses that hit max_new_tokens without ending lose
  `unfinished_penalty` from their score.
- log-probs are recomputed with logits divided by the temperature; the LM head runs only on the
  response positions (with a 262k vocabulary it costs more than the transformer body), and the
  log-softmax a chunk of positions at a time (ppo_core.logprobs_from_logits).
- reward: -kl_coef * (log p - log p_ref) per token (k1), plus the score on the last real token;
  kl_coef is fixed, or adaptive towards kl_target. Optional reward whitening keeps the mean.
- GAE (gamma, lambda) with the episode ending at the last real token; advantages whitened; clipped
  policy objective; clipped value loss weighted by vf_coef (a separate critic's forward and backward
  run after the policy's backward: no shared weights, the same gradients, and never both models'
  activations at once); `ppo_epochs` passes over shuffled minibatches; global gradient clipping;
  every loss and statistic is a masked mean over real response tokens, so padding and whatever
  follows the end never count.
- the prompts of a step are a pure function of (seed, step) and every response is sampled from its
  own seeded generator, so a resumed run draws exactly what the uninterrupted run drew; checkpoints
  hold the policy, the critic, optimizer, scheduler, RNG and the KL controller.

With several processes (`accelerate launch`) each process draws its own share of the step's
prompts; rewards and advantages are whitened per process, gradients are averaged. Under FSDP
(examples/accelerate/fsdp.yaml; cai.train.fsdp) the same loop runs with the policy and the critic
sharded: each process gathers the full policy to sample its rollouts (or streams full tensors into
its vLLM engine), and checkpoints and final/ hold full weights. The reference and the reward model
are frozen and stay whole on every process.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from cai.errors import CaiError
from cai.tokens import encode_prompt, ensure_pad_token, has_chat_template, render_chat
from cai.train.checkpoint import FINAL, save_final, write_json
from cai.train.fsdp import FullState, is_sharded
from cai.train.fsdp import requested as fsdp_requested
from cai.train.judge_watch import Divergence, detect_divergence, trace_from_metrics
from cai.train.loop import Session, open_run
from cai.train.lora import adapter_off, add_lora
from cai.train.metrics import METRICS, plot_curves, read_metrics, trim_after
from cai.train.models import disable_dropout, frozen_dtype, load_dtype, prepare_model
from cai.train.ppo_config import PPOConfig, PromptSource
from cai.train.ppo_core import (
    KLController,
    KLControllerState,
    explained_variance,
    gae,
    kl_penalised_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    response_mask,
    value_loss,
)
from cai.train.ppo_judge import PPOJudge, judge_due
from cai.train.ppo_models import (
    RewardFn,
    build_sampler,
    critic_values,
    forward,
    load_critic,
    reward_model_fn,
)
from cai.train.ppo_prompts import PromptSchedule, load_prompt_sources
from cai.train.rollout import Rollout, RolloutSampler

__all__ = ["PPOConfig", "PPOStepStats", "PPOSummary", "PromptSource", "run_ppo"]

SAMPLES = "samples.jsonl"


# ---------------------------------------------------------------- what a run writes


class PPOStepStats(BaseModel):
    """One PPO step's line in metrics.jsonl (split "train"); the report and the summary read these keys."""

    policy_loss: float
    value_loss: float
    clipfrac: float
    value_clipfrac: float
    approx_kl: float
    ratio_mean: float
    ratio_var: float
    grad_norm: float
    score: float = Field(description="mean raw score of the step's responses")
    score_std: float
    reward: float = Field(description="mean score after the unfinished penalty")
    non_score_reward: float = Field(description="mean summed KL penalty per episode")
    kl: float = Field(description="mean sequence KL to the reference (nats)")
    kl_coef: float
    entropy: float
    response_length: float
    unfinished: float = Field(description="share of responses that hit max_new_tokens")
    explained_variance: float
    tokens_per_s: float
    gen_tokens_per_s: float
    time_generate: float
    time_score: float
    time_prepare: float
    time_update: float
    lr: float
    judge_win_rate: float | None = Field(None, description="judged steps only: see cai.train.ppo_judge")


class PPOTotals(BaseModel):
    """Seconds spent per phase and tokens generated over the whole run (kept in checkpoints)."""

    generate: float = 0.0
    score: float = 0.0
    prepare: float = 0.0
    update: float = 0.0
    generated_tokens: float = 0.0


class PPOSummary(BaseModel):
    model: str
    reward: str
    steps: int
    episodes: int
    prompt_mix: dict[str, int] = Field(description="prompts per step from each source")
    wall_s: float
    score_start: float = Field(description="mean score over the first quarter of logged steps (1 to 5 steps)")
    score_end: float = Field(description="mean score over the last quarter of logged steps (1 to 5 steps)")
    kl_start: float
    kl_end: float
    response_length_start: float
    response_length_end: float
    time_share: dict[str, float] = Field(description="share of step time: generate, score, prepare, update")
    tokens_per_s: float = Field(description="generated tokens per second of whole PPO steps")
    final_dir: str
    divergence: Divergence | None = Field(None, description="the reward-hacking watch's verdict (judge_every > 0)")

    def render(self) -> str:
        share = ", ".join(f"{k} {v:.0%}" for k, v in self.time_share.items())
        return "\n".join([
            f"PPO: {self.steps} steps, {self.episodes} episodes, {self.wall_s:.1f}s, {self.tokens_per_s:.1f} generated tokens/s",
            (f"score {self.score_start:+.3f} -> {self.score_end:+.3f}, KL {self.kl_start:.3f} -> {self.kl_end:.3f}, "
            f"response length {self.response_length_start:.1f} -> {self.response_length_end:.1f}"),
            f"step time: {share}",
            *([f"reward-hacking watch: {self.divergence.message or 'no divergence'}"] if self.divergence else []),
            f"final policy: {self.final_dir}",
        ])


# ---------------------------------------------------------------- the loop


def run_ppo(config: PPOConfig, resume: bool = False, stop_after: int | None = None,
            reward_fn: RewardFn | None = None, progress: bool = True) -> PPOSummary:
    """Train (or resume) the policy with PPO; writes metrics.jsonl, tb/, curves.png, samples.jsonl,
    checkpoints/, final/ and summary.json into config.out_dir. `reward_fn` replaces the reward model
    (rule-based rewards); `stop_after` ends after that many steps (tests)."""
    from tqdm import tqdm

    start = time.perf_counter()
    run = setup(config, resume, reward_fn)
    state = run.session.state
    bar = tqdm(total=run.steps, initial=state.step, desc="ppo", disable=not (progress and run.acc.is_main_process),
               dynamic_ncols=True, leave=False)
    started = time.perf_counter() - state.elapsed_s
    try:
        while state.step < run.steps and (stop_after is None or state.step < stop_after):
            step_start = time.perf_counter()
            convs, batch = rollout(run)
            times = {"generate": time.perf_counter() - step_start}
            t0 = time.perf_counter()
            raw, scores = score(run, convs, batch)
            times["score"], t0 = time.perf_counter() - t0, time.perf_counter()
            episodes = prepare(run, batch, scores)
            times["prepare"], t0 = time.perf_counter() - t0, time.perf_counter()
            sums = update(run, batch, episodes)
            times["update"] = time.perf_counter() - t0
            stats = step_stats(run, batch, raw, scores, episodes, sums, times, time.perf_counter() - step_start)
            state.elapsed_s = time.perf_counter() - started
            paused = time.perf_counter()
            record(run, convs, batch, raw, episodes, stats)
            started += time.perf_counter() - paused  # checkpoint time is not training time
            bar.update(1)
            bar.set_postfix(score=f"{stats.score:+.3f}", kl=f"{stats.kl:.3f}")
    finally:
        bar.close()
        run.session.close()
    run.session.require_finished(run.steps)
    return finish(run, start, reward_fn)


# ---------------------------------------------------------------- setup


class PPORun:
    """What the phases of a run share: the session (policy + value module, optimizer, schedule,
    checkpoints, metrics), the frozen reference, the sampler, the reward, the prompts and the KL
    controller."""

    def __init__(self, config: PPOConfig, acc: Any, out: Path, model_path: str, tokenizer: Any, session: Session,
                 ref: Any, sampler: RolloutSampler, score_fn: RewardFn, schedule: PromptSchedule, steps: int,
                 judge: PPOJudge | None = None):
        self.config, self.acc, self.out, self.model_path, self.tokenizer = config, acc, out, model_path, tokenizer
        self.session, self.ref, self.sampler, self.score_fn = session, ref, sampler, score_fn
        # the value module: a separate critic (critic: reward_model), or a head on the policy (policy_head)
        separate = config.critic == "reward_model"
        self.critic: Any = session.modules["value"] if separate else None
        self.head: Any = None if separate else session.modules["value"]
        self.schedule, self.steps, self.judge = schedule, steps, judge
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        extra = session.state.extra
        self.kl_ctl = KLController(
            KLControllerState.model_validate(extra["kl_controller"]) if "kl_controller" in extra
            else KLControllerState(value=config.kl_coef, target=config.kl_target, horizon=config.kl_horizon))
        self.totals = PPOTotals.model_validate(extra.get("totals", {}))
        self._encoded: dict[str, list[int]] = {}

    @property
    def policy(self) -> Any:
        return self.session.model

    def encode(self, conv: list[dict[str, str]]) -> list[int]:
        """Prompt ids of a conversation (cached: the same prompts come back every epoch)."""
        text = render_chat(self.tokenizer, conv)
        if text not in self._encoded:
            self._encoded[text] = encode_prompt(self.tokenizer, text, self.config.max_prompt_tokens)
        return self._encoded[text]


def _check_config(config: PPOConfig, reward_fn: RewardFn | None) -> None:
    if reward_fn is None and config.reward_model is None:
        raise CaiError("reward_model is not set: give the trained reward model's directory (`cai train rm` final/)")
    if config.critic == "reward_model" and (config.critic_model or config.reward_model) is None:
        raise CaiError("critic: reward_model needs reward_model (or critic_model) to initialise the critic; "
                       "or use critic: policy_head")


def load_models(config: PPOConfig, device: torch.device) -> tuple[Any, Any, Any, Any, bool]:
    """(tokenizer, policy, frozen reference or None, value module, whether the policy's vocabulary grew).
    With LoRA there is no reference copy: the reference is the policy with its adapter off. The value
    module is the critic (from the reward model) or a zero-initialised head on the policy."""
    from cai.engines.hf import load_pretrained

    model_path = config.model_path()
    # with LoRA the policy's base is frozen: bf16 on a GPU (the adapters stay fp32)
    tokenizer, policy = load_pretrained(model_path, load_dtype(config.lora, device))
    vocab = policy.get_input_embeddings().weight.shape[0]
    ensure_pad_token(tokenizer, policy)
    prepare_model(policy, config)
    ref = None
    if config.lora is not None:
        policy = add_lora(policy, config.lora)
    else:
        _, ref = load_pretrained(model_path, getattr(torch, frozen_dtype(device)))
        if len(tokenizer) > ref.get_input_embeddings().weight.shape[0]:
            ref.resize_token_embeddings(len(tokenizer))
        disable_dropout(ref)
        ref.requires_grad_(False)
        ref.to(device).eval()
    if config.critic == "reward_model":
        value: Any = load_critic(str(config.critic_model or config.reward_model), tokenizer, config, device)
    else:
        value = torch.nn.Linear(policy.config.get_text_config().hidden_size, 1)
        torch.nn.init.zeros_(value.weight)
        torch.nn.init.zeros_(value.bias)
    return tokenizer, policy, ref, value, policy.get_input_embeddings().weight.shape[0] != vocab


def setup(config: PPOConfig, resume: bool, reward_fn: RewardFn | None) -> PPORun:
    """Models, prompts, the training session (restored from the last checkpoint on resume) and the sampler."""
    from cai.conversation import HH_STOP

    _check_config(config, reward_fn)
    out, last, acc = open_run(config, resume)
    if acc.distributed_type.value not in ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP"):
        raise CaiError(f"PPO runs on one device, data-parallel (DDP) or FSDP processes, not under "
                       f"{acc.distributed_type.value}; launch with examples/accelerate/ddp.yaml or fsdp.yaml")
    if config.critic_lora is not None and fsdp_requested(acc):
        raise CaiError("critic_lora: a LoRA critic runs on one device or data-parallel (DDP) processes, not under "
                       "FSDP; launch with examples/accelerate/ddp.yaml, or drop critic_lora to shard a full critic")
    if config.judge_every and fsdp_requested(acc):
        raise CaiError("judge_every (the reward-hacking watch) runs on one device or under DDP, not yet under FSDP: "
                       "set judge_every: 0 for the FSDP run and judge its checkpoints with `cai eval` instead")
    world = acc.num_processes
    sources = load_prompt_sources(config.prompts)  # before the models: a bad file fails in a second
    tokenizer, policy, ref, value, resized = load_models(config, acc.device)
    score_fn = reward_fn or reward_model_fn(config, acc.device, value)
    schedule = PromptSchedule(sources, [s.weight for s in config.prompts], config.prompts_per_step * world, config.seed)
    n_prompts = sum(len(s) for s in sources)
    steps = config.max_steps or max(1, math.ceil(config.epochs * n_prompts / (config.prompts_per_step * world)))
    updates_per_step = config.ppo_epochs * (config.episodes_per_step // (config.batch_size * config.grad_accum))
    session = Session(config, acc, out, {"policy": policy, "value": value}, tokenizer, steps * updates_per_step)
    value_module = acc.unwrap_model(session.modules["value"])
    if config.critic == "reward_model":
        session.extra_models["critic"] = value_module.model
    else:
        session.stateful["value_head"] = FullState(value_module) if is_sharded(value_module) else value_module
    stop = () if has_chat_template(tokenizer) else HH_STOP
    model_path = config.model_path()
    sampler = build_sampler(config, acc.unwrap_model(session.model), tokenizer, stop, model_path, world,
                            resized_vocab=resized)
    state = session.resume(last, steps)
    if acc.is_main_process:
        trim_after(out / SAMPLES, state.step)
    judge = PPOJudge(config) if config.judge_every and acc.is_main_process else None
    return PPORun(config, acc, out, model_path, tokenizer, session, ref, sampler, score_fn, schedule, steps, judge)


# ---------------------------------------------------------------- 1. rollout, 2. score


def _seeds(config: PPOConfig, step: int, rank: int, world: int) -> list[int]:
    """One distinct sampling seed per episode of a step and process."""
    n = config.episodes_per_step
    base = (config.seed * 1_000_003 + step) * n * world
    return [base + rank * n + e for e in range(n)]


def rollout(run: PPORun) -> tuple[list[list[dict[str, str]]], Rollout]:
    """This process's share of the step's prompts, each answered completions_per_prompt times."""
    config, step = run.config, run.session.state.step
    picked = run.schedule.step(step)[run.rank::run.world]
    convs = [c for _, c in picked for _ in range(config.completions_per_prompt)]
    run.sampler.sync(run.acc.unwrap_model(run.policy))  # vllm: copy in the weights of the last update (or checkpoint)
    with run.acc.autocast():
        batch = run.sampler.sample([run.encode(c) for c in convs], config.temperature, config.max_new_tokens,
                                   _seeds(config, step, run.rank, run.world))
    return convs, batch


def score(run: PPORun, convs: list[list[dict[str, str]]], batch: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw score, score less unfinished_penalty for responses that never ended) of each episode."""
    raw = torch.tensor(run.score_fn(convs, batch.texts), dtype=torch.float32)
    return raw, raw - run.config.unfinished_penalty * (~batch.ended).float()


# ---------------------------------------------------------------- 3. prepare


@dataclass
class Episodes:
    """The step's episodes as PPO sees them, all [episodes, response tokens] on CPU."""

    mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    non_score: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def reference_logprobs(run: PPORun, batch: Rollout, rows: torch.Tensor) -> torch.Tensor:
    """Log-probs of the sampled tokens under the frozen reference: its own copy, or with LoRA the
    policy with its adapter turned off (exactly the base model)."""
    if run.ref is not None:
        return forward(run.ref, batch, rows, run.config.temperature, run.device)[0]
    with adapter_off(run.policy):
        return forward(run.policy, batch, rows, run.config.temperature, run.device)[0]


def prepare(run: PPORun, batch: Rollout, scores: torch.Tensor) -> Episodes:
    """Log-probs of the sampled tokens under the policy and the reference, values, then the
    KL-penalised per-token rewards (score on the last token), GAE and whitened advantages."""
    config, n = run.config, len(batch.texts)
    mask = response_mask(batch.ended_at, batch.response.shape[1])
    old_logprobs, ref_logprobs, entropy, values = (torch.zeros_like(mask) for _ in range(4))
    with torch.no_grad(), run.acc.autocast():
        for chunk in torch.arange(n).split(config.batch_size):
            lp, ent, v = forward(run.policy, batch, chunk, config.temperature, run.device, head=run.head,
                                 want_entropy=True)
            if run.critic is not None:
                v = critic_values(run.critic, batch, chunk, run.device)
            old_logprobs[chunk], entropy[chunk], values[chunk] = lp.cpu(), ent.cpu(), v.cpu()
            ref_logprobs[chunk] = reference_logprobs(run, batch, chunk).cpu()
    values = values * mask
    rewards, kl, non_score = kl_penalised_rewards(old_logprobs, ref_logprobs, scores, mask, run.kl_ctl.value)
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    return Episodes(mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, entropy=entropy, values=values,
                    kl=kl, non_score=non_score, advantages=masked_whiten(advantages, mask), returns=returns)


# ---------------------------------------------------------------- 4. update


def _micro_step(run: PPORun, batch: Rollout, ep: Episodes, rows: torch.Tensor, n: int, where: str
                ) -> dict[str, torch.Tensor]:
    """Backpropagate one of n micro-batches' clipped policy loss + vf_coef * clipped value loss, and
    return its statistics. A separate critic shares no weight with the policy, so its forward pass runs
    after the policy's backward pass, with the same gradients as the summed loss: the critic's
    activations never exist beside the policy's, and the step's peak is the larger of the two."""
    config, device, session = run.config, run.device, run.session
    mk, old = ep.mask[rows].to(device), ep.old_logprobs[rows].to(device)
    with run.acc.autocast():
        lp, _, v = forward(run.policy, batch, rows, config.temperature, device, head=run.head)
    pg_loss, clipfrac, approx_kl = policy_loss(lp, old, ep.advantages[rows].to(device), mk, config.cliprange)
    if run.critic is not None:
        session.backward(pg_loss, n, where)
        with run.acc.autocast():
            v = critic_values(run.critic, batch, rows, device)
    vf_loss, vf_clipfrac = value_loss(v, ep.values[rows].to(device), ep.returns[rows].to(device), mk,
                                      config.cliprange_value)
    session.backward(config.vf_coef * vf_loss if run.critic is not None else pg_loss + config.vf_coef * vf_loss, n,
                     where)
    ratio = torch.exp((lp.detach() - old) * mk)
    return {"policy_loss": pg_loss, "value_loss": vf_loss, "clipfrac": clipfrac, "value_clipfrac": vf_clipfrac,
            "approx_kl": approx_kl, "ratio_mean": masked_mean(ratio, mk), "ratio_var": masked_var(ratio, mk)}


def update(run: PPORun, batch: Rollout, ep: Episodes) -> dict[str, float]:
    """ppo_epochs passes over shuffled minibatches of episodes, micro-batches accumulated into one
    optimizer step per minibatch. Returns the statistics summed over micro-batches and their count."""
    config, session, step = run.config, run.session, run.session.state.step
    n, minibatch = len(batch.texts), config.batch_size * config.grad_accum
    sums: dict[str, float] = {}
    counted = 0
    for epoch in range(config.ppo_epochs):
        g = torch.Generator().manual_seed((config.seed * 1_000_003 + step) * 1_009 + epoch)
        for m, mb in enumerate(torch.randperm(n, generator=g).split(minibatch)):
            micro = mb.split(config.batch_size)
            for k, rows in enumerate(micro):
                with session.micro_batch(k, len(micro)):
                    stats = _micro_step(run, batch, ep, rows, len(micro),
                                        f"ppo epoch {epoch}, minibatch {m}, episodes {rows.tolist()[:8]}")
                for key, val in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(val.detach())
                counted += 1
            norm = session.optimizer_step(f"ppo epoch {epoch}, minibatch {m}")
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm * len(micro)
    return {k: v / counted for k, v in sums.items()}


# ---------------------------------------------------------------- 5. record


def step_stats(run: PPORun, batch: Rollout, raw: torch.Tensor, scores: torch.Tensor, ep: Episodes,
               means: dict[str, float], times: dict[str, float], step_time: float) -> PPOStepStats:
    """The step's statistics, averaged over processes (the log describes the global step)."""
    n, lengths = len(batch.texts), ep.mask.sum(1)
    stats = dict(
        means, score=float(raw.mean()), score_std=float(raw.std()) if n > 1 else 0.0, reward=float(scores.mean()),
        non_score_reward=float(ep.non_score.sum(1).mean()), kl=float(ep.kl.sum(1).mean()), kl_coef=run.kl_ctl.value,
        entropy=float(masked_mean(ep.entropy, ep.mask)), response_length=float(lengths.float().mean()),
        unfinished=float((~batch.ended).float().mean()),
        explained_variance=explained_variance(ep.values, ep.returns, ep.mask),
        tokens_per_s=float(lengths.sum()) / step_time, gen_tokens_per_s=float(lengths.sum()) / times["generate"],
        **{f"time_{k}": v for k, v in times.items()}, lr=run.session.scheduler.get_last_lr()[0],
    )
    if run.world > 1:
        keys = sorted(stats)
        reduced = run.acc.reduce(torch.tensor([stats[k] for k in keys], device=run.device, dtype=torch.float64), "mean")
        stats = dict(zip(keys, reduced.tolist()))
    return PPOStepStats.model_validate(stats)


def record(run: PPORun, convs: list[list[dict[str, str]]], batch: Rollout, raw: torch.Tensor, ep: Episodes,
           stats: PPOStepStats) -> None:
    """Close the step: KL controller, run totals, state, metrics line, sample responses, checkpoint."""
    config, state, n = run.config, run.session.state, len(convs)
    run.kl_ctl.update(stats.kl, n * run.world)
    for key in ("generate", "score", "prepare", "update"):
        setattr(run.totals, key, getattr(run.totals, key) + getattr(stats, f"time_{key}"))
    run.totals.generated_tokens += stats.response_length * n * run.world
    state.step += 1
    state.samples += n * run.world
    state.extra["kl_controller"] = run.kl_ctl.state.model_dump()
    state.extra["totals"] = run.totals.model_dump()
    judged = judge_due(config, state.step, run.steps)
    if judged and run.judge is not None:  # the main process (setup refuses the watch under FSDP)
        stats.judge_win_rate = run.judge.win_rate(run.acc.unwrap_model(run.policy), run.ref, run.tokenizer).win_rate
    if judged or state.step % config.log_every == 0 or state.step == run.steps:
        run.session.log("train", stats.model_dump(exclude_none=True))
    if config.sample_every and run.acc.is_main_process and (state.step % config.sample_every == 0 or state.step == 1):
        lengths, seq_kl = ep.mask.sum(1), ep.kl.sum(1)
        with (run.out / SAMPLES).open("a", encoding="utf-8") as f:
            for i in range(min(config.samples_per_log, n)):
                f.write(json.dumps({
                    "step": state.step, "prompt": convs[i], "response": batch.texts[i], "score": float(raw[i]),
                    "finish": batch.finish_reasons[i], "tokens": int(lengths[i]), "kl": float(seq_kl[i]),
                }) + "\n")
    if state.step == run.steps or (config.save_every and state.step % config.save_every == 0):
        run.session.save()


# ---------------------------------------------------------------- finish


def finish(run: PPORun, start: float, reward_fn: RewardFn | None) -> PPOSummary:
    """final/ (the policy), curves.png and summary.json; `start`: perf_counter() when the run began."""
    config, out, state = run.config, run.out, run.session.state
    save_final(run.acc, run.policy, out / FINAL, run.tokenizer)
    if config.plot and run.acc.is_main_process:
        plot_curves(out / METRICS, out / "curves.png",
                    [("train", k) for k in ("score", "kl", "entropy", "value_loss", "explained_variance", "response_length")])
    rows = [r for r in read_metrics(out / METRICS) if r["split"] == "train"]
    window = max(1, min(5, len(rows) // 4))

    def mean_of(part: list[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in part) / len(part) if part else float("nan")

    head_rows, tail_rows = rows[:window], rows[-window:]
    step_time = {k: getattr(run.totals, k) for k in ("generate", "score", "prepare", "update")}
    all_time = sum(step_time.values()) or 1.0
    summary = PPOSummary(
        model=run.model_path if config.model else "gemma-3-270m (bundled)",
        reward="callable" if reward_fn is not None else str(config.reward_model), steps=state.step,
        episodes=state.samples,
        prompt_mix={Path(s.file).name: c for s, c in zip(config.prompts, run.schedule.counts)},
        wall_s=time.perf_counter() - start, score_start=mean_of(head_rows, "score"), score_end=mean_of(tail_rows, "score"),
        kl_start=mean_of(head_rows, "kl"), kl_end=mean_of(tail_rows, "kl"),
        response_length_start=mean_of(head_rows, "response_length"),
        response_length_end=mean_of(tail_rows, "response_length"),
        time_share={k: v / all_time for k, v in step_time.items()},
        tokens_per_s=run.totals.generated_tokens / all_time, final_dir=str(out / FINAL),
        divergence=detect_divergence(trace_from_metrics(rows)) if config.judge_every else None,
    )
    if run.acc.is_main_process:
        write_json(out / "summary.json", summary)
    return summary
