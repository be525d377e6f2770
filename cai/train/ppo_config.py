"""`cai train ppo` config: the shared TrainConfig fields plus the prompts, rollout, reward and PPO
settings (defaults from the PPO-for-language-models studies; see cai.train.ppo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai.train.config import LoraSettings, TrainConfig


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
    critic_lora: LoraSettings | None = Field(
        None, description="critic: reward_model only: LoRA adapters for the critic (its score head trains in full), "
        "also when the policy trains in full; default: the lora block. A LoRA critic started from the reward model "
        "itself holds the frozen reward model too (its adapters off): one copy of those weights, not two")
    prompts: list[PromptSource] = Field(min_length=1)
    max_prompt_tokens: int = Field(256, ge=8, description="longer prompts keep BOS and their last tokens")
    prompts_per_step: int = Field(8, ge=1, description="prompts sampled per PPO step (per process)")
    completions_per_prompt: int = Field(1, ge=1)
    rollout_engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: sample from the policy in memory; vllm: a vLLM engine in this process (one per "
        "GPU), the policy's weights copied into it before every rollout")
    vllm_options: dict[str, Any] = Field(
        default_factory=dict, description="vllm.LLM options for rollout_engine vllm (defaults: gpu_memory_utilization "
        "0.3, enable_prefix_caching true, dtype bfloat16 whatever the trainer's dtype; tensor_parallel_size must stay 1)")
    vllm_sleep: bool = Field(
        True, description="rollout_engine vllm: sleep the engine (level 1: KV cache freed, weights offloaded to "
        "CPU) during each update, and wake it before the next weight sync")
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
    judge_every: int = Field(0, ge=0, description="reward-hacking watch: every N steps (and the last) an AI judge "
                             "compares the policy's greedy answers to held-out prompts with the reference's; 0 = off")
    judge_prompts: str | None = Field(None, description="held-out prompts for the judge (JSONL/parquet, as `prompts`), "
                                      "never trained on; required with judge_every")
    judge_limit: int = Field(16, ge=1, description="judge the first N held-out prompts")
    judge_model: str | None = Field(None, description="the judge: local path or hub id; None = the bundled Gemma 3 270M")
    judge_constitution: str | None = Field(None, description="the judge's constitution; None = constitutions/harmless.yaml")
    judge_principles: int | None = Field(2, ge=1, description="principles per judged pair; None = all")
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

    @model_validator(mode="after")
    def _critic_lora(self) -> PPOConfig:
        if self.critic_lora is not None and self.critic != "reward_model":
            raise ValueError("critic_lora is for critic: reward_model; the policy_head value head trains with the policy")
        return self

    def critic_lora_settings(self) -> LoraSettings | None:
        """The critic's LoRA settings: critic_lora, else the lora block (None: the critic trains in full)."""
        return self.critic_lora or self.lora

    def critic_holds_reward_model(self) -> bool:
        """Whether the frozen reward model is the LoRA critic with its adapters off: the critic is a LoRA
        model loaded from the reward model's own directory (whose head it keeps, untrained, beside the
        one it trains)."""
        return (self.critic == "reward_model" and self.critic_lora_settings() is not None
                and self.reward_model is not None and self.critic_model in (None, self.reward_model))

    @model_validator(mode="after")
    def _judge(self) -> PPOConfig:
        if self.judge_every and self.judge_prompts is None:
            raise ValueError("judge_every needs judge_prompts: a file of held-out prompts the judge compares answers on")
        return self

    def judge_constitution_path(self) -> Path:
        from cai.stages.eval import CONSTITUTIONS

        return Path(self.judge_constitution) if self.judge_constitution else CONSTITUTIONS / "harmless.yaml"

    @property
    def episodes_per_step(self) -> int:
        return self.prompts_per_step * self.completions_per_prompt
