"""PPO for language models against a frozen reward model: the RL-CAI step.

One file, CleanRL style: the config at the top, then the models, the prompts, and `run_ppo`, whose
loop body is numbered: 1 rollout, 2 score, 3 old log-probs / reference log-probs / values,
4 KL-penalised rewards and GAE, 5 PPO epochs over minibatches, 6 log, sample, checkpoint. The tensor
arithmetic (GAE, losses, whitening, the KL controller) lives in cai.train.ppo_core, where each piece
is tested against a hand computation.

The implementation details that matter (Huang et al., "The N+ implementation details of RLHF with
PPO"; Ziegler et al. 2019), and where they are:
- four models: the policy (from the SFT model), a frozen reference copy of it, a critic (initialised
  from the reward model and read at every token, or a zero-initialised value head on the policy's
  last hidden state) and the frozen reward model. Dropout is off in all of them.
- rollouts sample at `temperature` (no top-p: the log-probs PPO recomputes must be those of the
  distribution that was sampled), with exact token ids, from the in-memory policy (rollout_engine
  hf) or from a vLLM engine in the same process whose weights are overwritten with the policy's
  before every rollout (rollout_engine vllm, GPUs); a response ends at an end token or a stop
  sequence (the HH format's next turn). Responses that hit max_new_tokens without ending lose
  `unfinished_penalty` from their score.
- log-probs are recomputed with logits divided by the temperature; the LM head runs only on the
  response positions (with a 262k vocabulary it costs more than the transformer body).
- reward: -kl_coef * (log p - log p_ref) per token (k1), plus the score on the last real token;
  kl_coef is fixed, or adaptive towards kl_target. Optional reward whitening keeps the mean.
- GAE (gamma, lambda) with the episode ending at the last real token; advantages whitened; clipped
  policy objective; clipped value loss weighted by vf_coef; `ppo_epochs` passes over shuffled
  minibatches; global gradient clipping; every loss and statistic is a masked mean over real
  response tokens, so padding and whatever follows the end never count.
- the prompts of a step are a pure function of (seed, step) and every response is sampled from its
  own seeded generator, so a resumed run draws exactly what the uninterrupted run drew; checkpoints
  hold the policy, the critic, optimizer, scheduler, RNG and the KL controller.

With several processes (`accelerate launch`) each process draws its own share of the step's
prompts; rewards and advantages are whitened per process, gradients are averaged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai.errors import CaiError
from cai.train.common import (
    FINAL,
    Checkpointer,
    MetricsLogger,
    TrainConfig,
    TrainState,
    build_optimizer,
    build_scheduler,
    check_finite,
    disable_dropout,
    dist_info,
    epoch_order,
    make_accelerator,
    plot_curves,
    prepare_model,
    read_metrics,
    resume_point,
    save_pretrained,
    seed_everything,
    write_json,
)
from cai.train.ppo_core import (
    KLController,
    KLControllerState,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalised_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    response_mask,
    value_loss,
)
from cai.train.rollout import PolicySampler, Rollout, RolloutSampler, VLLMSampler

# scores for (conversations, response texts); the reward model, or any callable (tests, rule rewards)
RewardFn = Callable[[list[list[dict[str, str]]], list[str]], list[float]]
SAMPLES = "samples.jsonl"


# ---------------------------------------------------------------- config


class PromptSource(BaseModel):
    """A file of prompts and its share of each step's prompts."""

    model_config = ConfigDict(extra="forbid")

    file: str
    kind: Literal["prompts", "pairs"] = Field(
        "prompts", description="prompts: prompt rows (red-team prompts); pairs: the prompts of human preference pairs"
    )
    weight: float = Field(1.0, gt=0, description="relative share of each step's prompts")
    limit: int | None = Field(None, ge=1, description="use only the first N rows")


class PPOConfig(TrainConfig):
    """`cai train ppo` config: the shared TrainConfig fields (model = the SFT policy; batch_size and
    grad_accum = episodes per micro-batch and micro-batches per minibatch) plus PPO settings."""

    reward_model: str | None = Field(None, description="trained reward model dir (`cai train rm` final/)")
    normalize_reward: bool = Field(True, description="score (r - mean) / std with the RM's stored statistics")
    critic: Literal["reward_model", "policy_head"] = Field(
        "reward_model", description="reward_model: a separate critic initialised from the RM; policy_head: a value "
        "head on the policy's last hidden state (shared trunk, one model less)")
    critic_model: str | None = Field(None, description="initialise the critic from this model instead of reward_model")
    prompts: list[PromptSource] = Field(min_length=1)
    max_prompt_tokens: int = Field(256, ge=8, description="longer prompts keep BOS and their last tokens")
    prompts_per_step: int = Field(8, ge=1, description="prompts sampled per PPO step (per process)")
    completions_per_prompt: int = Field(1, ge=1)
    rollout_engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: sample from the policy in memory; vllm: a vLLM engine in this process (one per "
        "GPU), the policy's weights copied into it before every rollout")
    vllm_options: dict[str, Any] = Field(
        default_factory=dict, description="vllm.LLM options for rollout_engine vllm (defaults: gpu_memory_utilization "
        "0.3, enable_prefix_caching true; tensor_parallel_size must stay 1)")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, gt=0, description="sampling temperature; log-probs use logits / temperature")
    unfinished_penalty: float = Field(1.0, ge=0, description="subtracted from the score of responses that never end")
    kl_coef: float = Field(0.05, ge=0, description="initial (or fixed) coefficient of the per-token KL penalty")
    kl_target: float | None = Field(None, gt=0, description="adaptive coefficient: target sequence KL (nats)")
    kl_horizon: int = Field(10_000, ge=1, description="adaptive coefficient: episodes per full adjustment")
    whiten_rewards: bool = Field(False, description="scale per-token rewards to unit variance (mean kept)")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    ppo_epochs: int = Field(4, ge=1, description="passes over each step's episodes")
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    reward_batch_size: int = Field(16, ge=1)
    reward_max_length: int = Field(1024, ge=8)
    sample_every: int = Field(10, ge=0, description="steps between logged sample responses; 0 = never")
    samples_per_log: int = Field(4, ge=1)
    # TrainConfig defaults changed for PPO (lr, Adam eps and linear decay as in the PPO-for-LMs studies)
    lr: float = Field(3e-6, gt=0)
    adam_eps: float = Field(1e-5, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    batch_size: int = Field(4, ge=1, description="episodes per micro-batch (forward pass)")
    log_every: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _sizes(self) -> PPOConfig:
        episodes, minibatch = self.episodes_per_step, self.batch_size * self.grad_accum
        if episodes % minibatch:
            raise ValueError(
                f"prompts_per_step * completions_per_prompt ({episodes}) must be a multiple of the minibatch "
                f"batch_size * grad_accum ({minibatch})"
            )
        return self

    @property
    def episodes_per_step(self) -> int:
        return self.prompts_per_step * self.completions_per_prompt


# ---------------------------------------------------------------- models


class TokenCritic(torch.nn.Module):
    """A sequence-classification model (the reward model) read at every position: its score head on
    each hidden state is the value of the state before the next token."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                keep: int) -> torch.Tensor:
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return self.model.score(hidden[:, -keep:]).squeeze(-1).float()


def _load_critic(path: str, tokenizer: Any) -> TokenCritic:
    """The critic from a reward model (its trained head) or any causal LM (a zero head)."""
    from transformers import AutoConfig

    from cai.train.reward import load_reward_model

    local_only = not Path(path).is_dir()
    trained = any(a.endswith("ForSequenceClassification")
                  for a in AutoConfig.from_pretrained(path, local_files_only=local_only).architectures or [])
    critic_tok, model = load_reward_model(path)
    if critic_tok.get_vocab() != tokenizer.get_vocab():
        raise CaiError(
            f"critic: reward_model needs a critic with the policy's tokenizer, and {path} has another one; "
            "use critic: policy_head, or set critic_model to a model with the policy's tokenizer"
        )
    if not trained:
        with torch.no_grad():
            model.score.weight.zero_()
    disable_dropout(model)
    model.config.use_cache = False
    return TokenCritic(model)


def reward_model_fn(config: PPOConfig, device: torch.device) -> RewardFn:
    """Scores from the frozen reward model, on the conversation + response rendered as in RM training."""
    from cai.train.reward import RewardScorer

    scorer = RewardScorer(str(config.reward_model), device=str(device), dtype="float32",
                          batch_size=config.reward_batch_size, max_length=config.reward_max_length,
                          normalize=config.normalize_reward)
    disable_dropout(scorer.model)

    def score(convs: list[list[dict[str, str]]], texts: list[str]) -> list[float]:
        return scorer.score_messages([c + [{"role": "assistant", "content": t}] for c, t in zip(convs, texts)])

    return score



def build_sampler(config: PPOConfig, policy: Any, tokenizer: Any, stop: tuple[str, ...], model_path: str,
                  world: int, resized_vocab: bool) -> RolloutSampler:
    """The rollout sampler of config.rollout_engine. The vLLM engine runs in this process (colocated with
    the trainer on its GPU; under `accelerate launch` through vLLM's external_launcher backend), so the
    weight sync before each rollout is an in-memory copy."""
    if config.rollout_engine == "hf":
        return PolicySampler(policy, tokenizer, stop)
    options = {"gpu_memory_utilization": 0.3, "enable_prefix_caching": True, **config.vllm_options}
    if options.get("tensor_parallel_size", 1) != 1:
        raise CaiError("rollout_engine vllm: tensor_parallel_size must be 1 (each process samples with its own engine "
                       "on its own GPU); scale out with more `accelerate launch` processes")
    if resized_vocab:
        raise CaiError(f"rollout_engine vllm: the tokenizer of {model_path} has no pad token, so the policy grew a "
                       "row for one and vLLM's copy of the model would no longer match; give the tokenizer a pad "
                       "token (e.g. train SFT with cai, which saves one) or use rollout_engine hf")
    if world > 1:
        options.setdefault("distributed_executor_backend", "external_launcher")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: sync by reference
    from cai.engines.vllm import VLLMEngine

    dtype = "bfloat16" if config.dtype == "bf16" else "float32"
    engine = VLLMEngine(model_path, dtype=options.pop("dtype", dtype), **options)
    return VLLMSampler(engine, tokenizer, stop)


# ---------------------------------------------------------------- prompts


def load_prompt_sources(sources: list[PromptSource]) -> list[list[list[dict[str, str]]]]:
    """Each source's prompts as conversations ending with the user turn to answer."""
    from cai.conversation import as_dicts
    from cai.stages.inputs import load_prompts
    from cai.stages.pairs import read_human_pairs

    out = []
    for src in sources:
        if src.kind == "prompts":
            convs = load_prompts(src.file, limit=src.limit)
        else:
            convs = [p.prompt for p in read_human_pairs(src.file, limit=src.limit)[0]]
        out.append([as_dicts(c) for c in convs])
    return out


def apportion(total: int, weights: list[float]) -> list[int]:
    """Split `total` into integer shares proportional to weights (largest remainder, ties to the first)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


class PromptSchedule:
    """The prompts of each step: source j gives counts[j] prompts per step, walking through a fresh
    seeded permutation of its file each epoch. A pure function of (seed, step): resume needs no
    data position beyond the step."""

    def __init__(self, sources: list[list[list[dict[str, str]]]], weights: list[float], per_step: int, seed: int):
        self.sources, self.seed = sources, seed
        self.counts = apportion(per_step, weights)
        self._orders: dict[tuple[int, int], list[int]] = {}

    def _index(self, source: int, t: int) -> int:
        n = len(self.sources[source])
        epoch, i = divmod(t, n)
        key = (source, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}
            self._orders[key] = epoch_order(n, self.seed + 7919 * source, epoch)
        return self._orders[key][i]

    def step(self, step: int) -> list[tuple[int, list[dict[str, str]]]]:
        """(source index, conversation) of every prompt of a step, sources in config order."""
        out = []
        for j, k in enumerate(self.counts):
            out += [(j, self.sources[j][self._index(j, t)]) for t in range(step * k, (step + 1) * k)]
        return out


# ---------------------------------------------------------------- forward passes


def _sequence(batch: Rollout, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """input ids, attention mask, position ids of query + response for `rows`, and the response mask."""
    from cai.engines.hf import position_ids

    response = batch.response[rows]
    mask = response_mask(batch.ended_at[rows], response.shape[1])
    ids = torch.cat([batch.query[rows], response], dim=1).to(device)
    attention = torch.cat([batch.query_mask[rows], mask.long()], dim=1).to(device)
    return ids, attention, position_ids(attention), response.to(device), mask.to(device)


def forward(policy: Any, batch: Rollout, rows: torch.Tensor, temperature: float, device: torch.device,
            critic: Any = None, head: Any = None, want_entropy: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs of the sampled response tokens (logits / temperature), their entropy (if asked)
    and the values (from a separate `critic`, or a `head` on the policy's last hidden state), all
    [rows, R]. Position Q - 1 + t predicts response token t, so the LM head and the critic run only
    on the last R + 1 positions."""
    ids, attention, positions, response, _ = _sequence(batch, rows, device)
    keep = response.shape[1] + 1
    out = policy(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=keep,
                 output_hidden_states=head is not None, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature
    logprobs = logprobs_from_logits(logits, response)
    entropy = entropy_from_logits(logits.detach()) if want_entropy else None
    values = None
    if head is not None:
        values = head(out.hidden_states[-1][:, -keep:-1]).squeeze(-1).float()
    elif critic is not None:
        values = critic(ids, attention, positions, keep)[:, :-1]
    return logprobs, entropy, values


# ---------------------------------------------------------------- the run


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

    def render(self) -> str:
        share = ", ".join(f"{k} {v:.0%}" for k, v in self.time_share.items())
        return "\n".join([
            f"PPO: {self.steps} steps, {self.episodes} episodes, {self.wall_s:.1f}s, {self.tokens_per_s:.1f} generated tokens/s",
            (f"score {self.score_start:+.3f} -> {self.score_end:+.3f}, KL {self.kl_start:.3f} -> {self.kl_end:.3f}, "
            f"response length {self.response_length_start:.1f} -> {self.response_length_end:.1f}"),
            f"step time: {share}",
            f"final policy: {self.final_dir}",
        ])


def _seeds(config: PPOConfig, step: int, rank: int, world: int) -> list[int]:
    """One distinct sampling seed per episode of a step and process."""
    n = config.episodes_per_step
    base = (config.seed * 1_000_003 + step) * n * world
    return [base + rank * n + e for e in range(n)]


def _trim_samples(path: Path, step: int) -> None:
    """Drop sample rows logged after `step` (a resumed run logs them again)."""
    if path.exists():
        rows = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def run_ppo(config: PPOConfig, resume: bool = False, stop_after: int | None = None,
            reward_fn: RewardFn | None = None, progress: bool = True) -> PPOSummary:
    """Train (or resume) the policy with PPO; writes metrics.jsonl, tb/, curves.png, samples.jsonl,
    checkpoints/, final/ and summary.json into config.out_dir. `reward_fn` replaces the reward model
    (rule-based rewards); `stop_after` ends after that many steps (tests)."""
    from tqdm import tqdm

    from cai.conversation import HH_STOP
    from cai.engines.hf import encode_prompt, ensure_pad_token, load_pretrained
    from cai.train.sft import has_chat_template, render_prompt

    start = time.perf_counter()
    if reward_fn is None and config.reward_model is None:
        raise CaiError("reward_model is not set: give the trained reward model's directory (`cai train rm` final/)")
    if config.critic == "reward_model" and (config.critic_model or config.reward_model) is None:
        raise CaiError("critic: reward_model needs reward_model (or critic_model) to initialise the critic; "
                       "or use critic: policy_head")
    out = Path(config.out_dir)
    last = resume_point(out, resume)
    acc = make_accelerator(config)
    if acc.distributed_type.value not in ("NO", "MULTI_GPU", "MULTI_CPU"):
        raise CaiError(f"PPO runs on one device or data-parallel (DDP) processes, not under {acc.distributed_type.value}: "
                       "the policy samples its rollouts unsharded; launch with examples/accelerate/ddp.yaml")
    rank, world = dist_info(acc)
    device = acc.device
    seed_everything(config.seed)

    sources = load_prompt_sources(config.prompts)  # before the models: a bad file fails in a second

    # ---- models: policy, frozen reference, critic, frozen reward
    model_path = config.model_path()
    tokenizer, policy = load_pretrained(model_path, torch.float32)
    vocab = policy.get_input_embeddings().weight.shape[0]
    ensure_pad_token(tokenizer, policy)
    prepare_model(policy, config)
    _, ref = load_pretrained(model_path, torch.float32)
    if len(tokenizer) > ref.get_input_embeddings().weight.shape[0]:
        ref.resize_token_embeddings(len(tokenizer))
    disable_dropout(ref)
    ref.requires_grad_(False)
    ref.to(device).eval()
    critic, head = None, None
    if config.critic == "reward_model":
        critic = _load_critic(str(config.critic_model or config.reward_model), tokenizer)
    else:
        head = torch.nn.Linear(policy.config.get_text_config().hidden_size, 1)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    score_fn = reward_fn or reward_model_fn(config, device)
    trained = acc.prepare(policy)
    value_module = acc.prepare(critic if critic is not None else head)
    optimizer = acc.prepare(build_optimizer(torch.nn.ModuleDict({"policy": trained, "value": value_module}), config))

    # ---- prompt schedule, steps, sampler
    schedule = PromptSchedule(sources, [s.weight for s in config.prompts], config.prompts_per_step * world, config.seed)
    n_prompts = sum(len(s) for s in sources)
    steps = config.max_steps or max(1, math.ceil(config.epochs * n_prompts / (config.prompts_per_step * world)))
    minibatch = config.batch_size * config.grad_accum
    updates_per_step = config.ppo_epochs * (config.episodes_per_step // minibatch)
    scheduler = build_scheduler(optimizer, config, steps * updates_per_step)
    stop = () if has_chat_template(tokenizer) else HH_STOP
    sampler = build_sampler(config, acc.unwrap_model(trained), tokenizer, stop, model_path, world,
                            resized_vocab=policy.get_input_embeddings().weight.shape[0] != vocab)
    encoded: dict[str, list[int]] = {}

    def encode(conv: list[dict[str, str]]) -> list[int]:
        text = render_prompt(tokenizer, conv)
        if text not in encoded:
            encoded[text] = encode_prompt(tokenizer, text, config.max_prompt_tokens)
        return encoded[text]

    # ---- resume
    checkpointer = Checkpointer(out, acc, config.keep_checkpoints)
    stateful: dict[str, Any] = {"optimizer": optimizer, "scheduler": scheduler}
    if head is not None:
        stateful["value_head"] = acc.unwrap_model(value_module)
    extra_models = {"critic": acc.unwrap_model(value_module).model} if critic is not None else {}
    state = TrainState()
    if last is not None:
        state = checkpointer.restore(last, trained, stateful, extra_models)
        if acc.is_main_process:
            print(f"resuming from {last} (step {state.step} of {steps})")
    kl_ctl = KLController(KLControllerState.model_validate(state.extra["kl_controller"]) if "kl_controller" in state.extra
                          else KLControllerState(value=config.kl_coef, target=config.kl_target, horizon=config.kl_horizon))
    logger = MetricsLogger(out, enabled=acc.is_main_process, resume_step=state.step if last else None)
    samples_path = out / SAMPLES
    if acc.is_main_process:
        _trim_samples(samples_path, state.step)
    trainables = [trained, value_module]
    value_kw = {"critic": value_module} if critic is not None else {"head": value_module}
    totals = state.extra.setdefault("totals", {"generate": 0.0, "score": 0.0, "prepare": 0.0, "update": 0.0,
                                               "generated_tokens": 0.0})
    bar = tqdm(total=steps, initial=state.step, desc="ppo", disable=not (progress and acc.is_main_process), dynamic_ncols=True, leave=False)
    started = time.perf_counter() - state.elapsed_s
    try:
        while state.step < steps:
            if stop_after is not None and state.step >= stop_after:
                break
            step_start = time.perf_counter()
            # 1. rollout: this process's share of the step's prompts, each answered completions_per_prompt times
            picked = schedule.step(state.step)[rank::world]
            convs = [c for _, c in picked for _ in range(config.completions_per_prompt)]
            sampler.sync(acc.unwrap_model(trained))  # vllm: copy in the weights of the last update (or checkpoint)
            with acc.autocast():
                batch = sampler.sample([encode(c) for c in convs], config.temperature, config.max_new_tokens,
                                       _seeds(config, state.step, rank, world))
            t_generate = time.perf_counter() - step_start

            # 2. score: reward of each full response; responses that never ended lose unfinished_penalty
            t0 = time.perf_counter()
            raw = torch.tensor(score_fn(convs, batch.texts), dtype=torch.float32)
            scores = raw - config.unfinished_penalty * (~batch.ended).float()
            t_score = time.perf_counter() - t0

            # 3. log-probs of the sampled tokens under the policy and the reference, and the values
            t0 = time.perf_counter()
            n = len(convs)
            mask = response_mask(batch.ended_at, batch.response.shape[1])
            old_logprobs, ref_logprobs, entropy, values = (torch.zeros_like(mask) for _ in range(4))
            with torch.no_grad(), acc.autocast():
                for chunk in torch.arange(n).split(config.batch_size):
                    lp, ent, v = forward(trained, batch, chunk, config.temperature, device, **value_kw, want_entropy=True)
                    old_logprobs[chunk], entropy[chunk], values[chunk] = lp.cpu(), ent.cpu(), v.cpu()
                    ref_logprobs[chunk] = forward(ref, batch, chunk, config.temperature, device)[0].cpu()
            values = values * mask

            # 4. rewards: per-token KL penalty + score on the last token; GAE; whitened advantages
            rewards, kl, non_score = kl_penalised_rewards(old_logprobs, ref_logprobs, scores, mask, kl_ctl.value)
            if config.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
            advantages = masked_whiten(advantages, mask)
            t_prepare = time.perf_counter() - t0

            # 5. PPO epochs over shuffled minibatches of episodes, micro-batches accumulated
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            counted = 0
            for epoch in range(config.ppo_epochs):
                g = torch.Generator().manual_seed((config.seed * 1_000_003 + state.step) * 1_009 + epoch)
                order = torch.randperm(n, generator=g)
                for m, mb in enumerate(order.split(minibatch)):
                    micro = mb.split(config.batch_size)
                    for k, rows in enumerate(micro):
                        with contextlib.ExitStack() as stack:
                            if k < len(micro) - 1:  # DDP: all-reduce gradients on the last micro-batch only
                                for module in trainables:
                                    stack.enter_context(acc.no_sync(module))
                            with acc.autocast():
                                lp, _, v = forward(trained, batch, rows, config.temperature, device, **value_kw)
                            mk = mask[rows].to(device)
                            pg_loss, clipfrac, approx_kl = policy_loss(lp, old_logprobs[rows].to(device),
                                                                       advantages[rows].to(device), mk, config.cliprange)
                            vf_loss, vf_clipfrac = value_loss(v, values[rows].to(device), returns[rows].to(device),
                                                              mk, config.cliprange_value)
                            loss = pg_loss + config.vf_coef * vf_loss
                            where = f"ppo epoch {epoch}, minibatch {m}, episodes {rows.tolist()[:8]}"
                            check_finite(loss, "loss", state.step, where, checkpointer.last)
                            acc.backward(loss / len(micro))
                        ratio = torch.exp((lp.detach() - old_logprobs[rows].to(device)) * mk)
                        for key, val in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clipfrac", clipfrac),
                                         ("value_clipfrac", vf_clipfrac), ("approx_kl", approx_kl),
                                         ("ratio_mean", masked_mean(ratio, mk)), ("ratio_var", masked_var(ratio, mk))):
                            sums[key] = sums.get(key, 0.0) + float(val.detach())
                        counted += 1
                    params = [p for module in trainables for p in module.parameters() if p.requires_grad]
                    norm = acc.clip_grad_norm_(params, config.max_grad_norm) if config.max_grad_norm else \
                        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
                    check_finite(norm, "gradient norm", state.step, f"ppo epoch {epoch}, minibatch {m}", checkpointer.last)
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(norm) * len(micro)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            t_update = time.perf_counter() - t0

            # 6. statistics, KL controller, log, samples, checkpoint
            lengths = mask.sum(1)
            seq_kl = kl.sum(1)
            stats = {k: v / counted for k, v in sums.items()}
            step_time = time.perf_counter() - step_start
            stats.update(
                score=float(raw.mean()), score_std=float(raw.std()) if n > 1 else 0.0, reward=float(scores.mean()),
                non_score_reward=float(non_score.sum(1).mean()), kl=float(seq_kl.mean()), kl_coef=kl_ctl.value,
                entropy=float(masked_mean(entropy, mask)), response_length=float(lengths.float().mean()),
                unfinished=float((~batch.ended).float().mean()),
                explained_variance=explained_variance(values, returns, mask),
                tokens_per_s=float(lengths.sum()) / step_time, gen_tokens_per_s=float(lengths.sum()) / t_generate,
                time_generate=t_generate, time_score=t_score, time_prepare=t_prepare, time_update=t_update,
                lr=scheduler.get_last_lr()[0],
            )
            keys = sorted(stats)
            if world > 1:  # average over processes: the log describes the global step
                reduced = acc.reduce(torch.tensor([stats[k] for k in keys], device=device, dtype=torch.float64), "mean")
                stats = dict(zip(keys, reduced.tolist()))
            kl_ctl.update(stats["kl"], n * world)
            for key in ("generate", "score", "prepare", "update"):
                totals[key] += stats[f"time_{key}"]
            totals["generated_tokens"] += stats["response_length"] * n * world
            state.step += 1
            state.samples += n * world
            state.elapsed_s = time.perf_counter() - started
            state.extra["kl_controller"] = kl_ctl.state.model_dump()
            bar.update(1)
            bar.set_postfix(score=f"{stats['score']:+.3f}", kl=f"{stats['kl']:.3f}")
            if state.step % config.log_every == 0 or state.step == steps:
                logger.log(state.step, "train", stats)
            if config.sample_every and acc.is_main_process and (state.step % config.sample_every == 0 or state.step == 1):
                with samples_path.open("a", encoding="utf-8") as f:
                    for i in range(min(config.samples_per_log, n)):
                        f.write(json.dumps({
                            "step": state.step, "prompt": convs[i], "response": batch.texts[i], "score": float(raw[i]),
                            "finish": batch.finish_reasons[i], "tokens": int(lengths[i]), "kl": float(seq_kl[i]),
                        }) + "\n")
            paused = time.perf_counter()
            if state.step == steps or (config.save_every and state.step % config.save_every == 0):
                checkpointer.save(state, trained, tokenizer, stateful, extra_models, config=config)
            started += time.perf_counter() - paused  # checkpoint time is not training time
    finally:
        bar.close()
        logger.close()
    if state.step < steps:
        raise CaiError(f"stopped after step {state.step} of {steps}; rerun with --resume to continue")

    save_pretrained(acc, trained, out / FINAL, tokenizer)
    if config.plot and acc.is_main_process:
        plot_curves(out / "metrics.jsonl", out / "curves.png",
                    [("train", k) for k in ("score", "kl", "entropy", "value_loss", "explained_variance", "response_length")])
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    window = max(1, min(5, len(rows) // 4))

    def mean_of(part: list[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in part) / len(part) if part else float("nan")

    head_rows, tail_rows = rows[:window], rows[-window:]
    step_time = {k: totals[k] for k in ("generate", "score", "prepare", "update")}
    all_time = sum(step_time.values()) or 1.0
    summary = PPOSummary(
        model=model_path if config.model else "gemma-3-270m (bundled)",
        reward="callable" if reward_fn is not None else str(config.reward_model), steps=state.step,
        episodes=state.samples,
        prompt_mix={Path(s.file).name: c for s, c in zip(config.prompts, schedule.counts)},
        wall_s=time.perf_counter() - start, score_start=mean_of(head_rows, "score"), score_end=mean_of(tail_rows, "score"),
        kl_start=mean_of(head_rows, "kl"), kl_end=mean_of(tail_rows, "kl"),
        response_length_start=mean_of(head_rows, "response_length"),
        response_length_end=mean_of(tail_rows, "response_length"),
        time_share={k: v / all_time for k, v in step_time.items()},
        tokens_per_s=totals["generated_tokens"] / all_time, final_dir=str(out / FINAL),
    )
    if acc.is_main_process:
        write_json(out / "summary.json", summary)
    return summary
