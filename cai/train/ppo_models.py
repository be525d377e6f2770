"""The models around the PPO policy and their forward passes: the critic (the reward model read at
every token, or a value head on the policy), the frozen reward model as a scoring function, the
rollout sampler, and the log-probs/values of sampled episodes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from cai.errors import CaiError
from cai.tokens import position_ids
from cai.train.lora import add_lora, base_of
from cai.train.models import disable_dropout, fp32_head, frozen_dtype, load_dtype, prepare_model
from cai.train.ppo_config import PPOConfig
from cai.train.ppo_core import entropy_from_logits, logprobs_from_logits, response_mask
from cai.train.rollout import PolicySampler, Rollout, RolloutSampler, VLLMSampler

# scores for (conversations, response texts); the reward model, or any callable (tests, rule rewards)
RewardFn = Callable[[list[list[dict[str, str]]], list[str]], list[float]]


class TokenCritic(torch.nn.Module):
    """A sequence-classification model (the reward model) read at every position: its score head on
    each hidden state is the value of the state before the next token. `reward_tokenizer` is set when
    the model is a LoRA model loaded from the reward model, which then also scores with its adapters
    off (and that tokenizer, the reward model's own)."""

    def __init__(self, model: Any, reward_tokenizer: Any = None):
        super().__init__()
        self.model = model
        self.reward_tokenizer = reward_tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                keep: int) -> torch.Tensor:
        model = base_of(self.model)  # with LoRA, its layers carry the critic's adapters
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return model.score(hidden[:, -keep:]).squeeze(-1).float()


def load_critic(path: str, tokenizer: Any, config: PPOConfig, device: torch.device) -> TokenCritic:
    """The critic from a reward model (its trained head) or any causal LM (a zero head). With LoRA
    (config.critic_lora_settings()), the critic trains its own adapters on its frozen base (bf16 on a
    GPU) and its head in full (fp32); loaded from the reward model itself, it holds the reward model."""
    from transformers import AutoConfig

    from cai.train.reward import load_reward_model

    local_only = not Path(path).is_dir()
    trained = any(a.endswith("ForSequenceClassification")
                  for a in AutoConfig.from_pretrained(path, local_files_only=local_only).architectures or [])
    lora = config.critic_lora_settings()
    critic_tok, model = load_reward_model(path, load_dtype(lora, device))
    if critic_tok.get_vocab() != tokenizer.get_vocab():
        raise CaiError(
            f"critic: reward_model needs a critic with the policy's tokenizer, and {path} has another one; "
            "use critic: policy_head, or set critic_model to a model with the policy's tokenizer"
        )
    if not trained:
        with torch.no_grad():
            model.score.weight.zero_()
    prepare_model(model, config)
    if lora is not None:
        fp32_head(model.score)
        model = add_lora(model, lora, full=("score",))
    return TokenCritic(model, critic_tok if trained and config.critic_holds_reward_model() else None)


def reward_model_fn(config: PPOConfig, device: torch.device, critic: Any = None) -> RewardFn:
    """Scores from the frozen reward model, on the conversation + response rendered as in RM training:
    the critic with its adapters off when it holds the reward model, else a copy of its own."""
    from cai.train.reward import RewardScorer

    options = {"batch_size": config.reward_batch_size, "max_length": config.reward_max_length,
               "normalize": config.normalize_reward}
    if isinstance(critic, TokenCritic) and critic.reward_tokenizer is not None:
        scorer = RewardScorer.inside_lora(critic.reward_tokenizer, critic.model, device, **options)
    else:
        # frozen: bf16 on a GPU whatever the trainer's dtype (half the memory, and the score only ranks)
        scorer = RewardScorer(str(config.reward_model), device=str(device), dtype=frozen_dtype(device), **options)
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
    options = {"gpu_memory_utilization": 0.3, "enable_prefix_caching": True, "enable_sleep_mode": config.vllm_sleep,
               **config.vllm_options}
    if options.get("tensor_parallel_size", 1) != 1:
        raise CaiError("rollout_engine vllm: tensor_parallel_size must be 1 (each process samples with its own engine "
                       "on its own GPU); scale out with more `accelerate launch` processes")
    if resized_vocab:
        raise CaiError(f"rollout_engine vllm: the tokenizer of {model_path} has no pad token, so the policy grew a "
                       "row for one and vLLM's copy of the model would no longer match; give the tokenizer a pad "
                       "token (e.g. train SFT with cai, which saves one) or use rollout_engine hf")
    if world > 1:
        options.setdefault("distributed_executor_backend", "external_launcher")
    from cai.engines.vllm import VLLMEngine

    # bf16 whatever the trainer's dtype: fp32 takes vLLM's slow attention path and doubles the KV cache.
    # The engine core must live in this process for the weight sync, whatever the user exported.
    with _env("VLLM_ENABLE_V1_MULTIPROCESSING", "0"):
        engine = VLLMEngine(model_path, dtype=options.pop("dtype", "bfloat16"), **options)
    return VLLMSampler(engine, tokenizer, stop, sleep=bool(options.get("enable_sleep_mode")))


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the block, then restore the caller's value (or its absence)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _sequence(batch: Rollout, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """input ids, attention mask, position ids of query + response for `rows`, and the response mask."""
    response = batch.response[rows]
    mask = response_mask(batch.ended_at[rows], response.shape[1])
    ids = torch.cat([batch.query[rows], response], dim=1).to(device)
    attention = torch.cat([batch.query_mask[rows], mask.long()], dim=1).to(device)
    return ids, attention, position_ids(attention), response.to(device), mask.to(device)


def forward(policy: Any, batch: Rollout, rows: torch.Tensor, temperature: float, device: torch.device,
            head: Any = None, want_entropy: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs of the sampled response tokens (logits / temperature), their entropy (if asked)
    and the values of a `head` on the policy's last hidden state (if given), all [rows, R]. Position
    Q - 1 + t predicts response token t, so the LM head and the value head run only on the last R + 1
    positions."""
    ids, attention, positions, response, _ = _sequence(batch, rows, device)
    keep = response.shape[1] + 1
    out = policy(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=keep,
                 output_hidden_states=head is not None, use_cache=False)
    logprobs = logprobs_from_logits(out.logits, response, temperature)  # the last position is ignored
    entropy = entropy_from_logits(out.logits, response.shape[1], temperature) if want_entropy else None
    values = None
    if head is not None:
        values = head(out.hidden_states[-1][:, -keep:-1].float()).squeeze(-1).float()
    return logprobs, entropy, values


def critic_values(critic: Any, batch: Rollout, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Values [rows, R] of a separate critic (TokenCritic): its score at the R positions before each
    response token."""
    ids, attention, positions, response, _ = _sequence(batch, rows, device)
    return critic(ids, attention, positions, response.shape[1] + 1)[:, :-1]
