"""A memory plan for a PPO run before it starts (`cai train ppo CONFIG --plan`): the estimated bytes
per GPU of each component, and a warning when the sum will not fit.

Why: an out-of-memory error after a model has loaded and vLLM has started costs minutes and says
little; the arithmetic below says which component to shrink (LoRA, gradient checkpointing, a
smaller vLLM share, fewer episodes per micro-batch). The rules, in bytes:

- trainable weights are fp32 (4 per parameter, also under bf16 mixed precision), their gradients
  fp32 (4) and AdamW's two moments fp32 (8): 16 per trainable parameter;
- frozen models live in bf16 on a GPU (2 per parameter): the reference (none with LoRA: it is the
  policy with its adapter off), the reward model, and with LoRA the bases of policy and critic (a
  LoRA critic loaded from the reward model is also the reward model, its adapters off: counted once);
- LoRA adds r * (in + out) trainable parameters per adapted linear layer; heads trained in full
  (the critic's score, the policy_head value head: hidden + 1) count as trainable;
- vLLM (rollout_engine vllm) reserves gpu_memory_utilization of the whole GPU while it is awake;
- activations of one micro-batch (batch_size episodes of max_prompt_tokens + max_new_tokens tokens)
  for the policy and, when it is a separate model, the critic: 34 bytes per token, hidden unit and
  layer at 2-byte precision (Korthikanti et al. 2022, without the attention-score term that
  flash/SDPA attention does not keep), doubled for fp32; with gradient checkpointing only each
  layer's input (hidden * activation bytes per token and layer) plus one layer's full set; plus the
  policy's fp32 logits over the response tokens and their log-softmax (2 * 4 * vocab per token).

Under DDP every GPU holds all of it, so the per-GPU figure does not fall with the world size. Under
FSDP (`sharded`) the trainable models (policy and critic) are split across the GPUs: their weights,
gradients and AdamW moments are divided by the world size (rounded up), while the frozen models
stay whole on every GPU. A sharded policy is gathered whole to sample its rollouts (rollout_engine
hf: all its weights at once, at the trainer's precision) or gathered one block at a time for the
forward passes and the vLLM weight sync (one transformer layer's share); that is the `gathered` row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cai.errors import CaiError
from cai.train.config import LoraSettings
from cai.train.ppo_config import PPOConfig

GIB = 1024**3
ADAM_BYTES = 16  # fp32 weight + fp32 gradient + two fp32 moments, per trainable parameter
FROZEN_BYTES = 2  # bf16 on a GPU
ACTIVATION_BYTES_PER_UNIT = 34  # per token, hidden unit and layer, at 2-byte precision


class ModelShape(BaseModel):
    """What the plan needs to know about a model: parameter count, sizes, and its linear layers
    (name, in features, out features) for counting LoRA adapters."""

    params: int
    hidden: int
    layers: int
    vocab: int
    linears: list[tuple[str, int, int]] = Field(default_factory=list)
    output_head: str | None = Field(None, description="name of the output head, never adapted by all-linear")

    def lora_params(self, lora: LoraSettings) -> int:
        """Trainable adapter parameters: r * (in + out) per adapted linear layer."""
        return sum(lora.r * (i + o) for name, i, o in self.linears if _adapted(name, lora, self.output_head))


def _adapted(name: str, lora: LoraSettings, head: str | None) -> bool:
    if lora.target_modules == "all-linear":
        return name != head
    return any(name == t or name.endswith("." + t) for t in lora.target_modules)  # peft's suffix rule


class MemoryPlan(BaseModel):
    """Estimated bytes per GPU of each component of a PPO run."""

    world_size: int
    sharded: bool = False
    gpu_bytes: int
    weights: int
    grads: int
    optimizer: int
    vllm: int
    activations: int
    gathered: int = 0
    trainable_params: int
    frozen_params: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.vllm + self.activations + self.gathered

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes

    def render(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.grads), ("optimizer (AdamW)", self.optimizer),
                ("vLLM share", self.vllm), ("activations", self.activations)]
        if self.sharded:
            rows.append(("gathered (FSDP)", self.gathered))
        rows.append(("total", self.total))
        processes = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        params = f"{self.trainable_params / 1e6:,.1f}M trainable and {self.frozen_params / 1e6:,.1f}M frozen parameters"
        lines = [f"memory plan per GPU ({processes}, {'FSDP' if self.sharded else 'DDP'}; {params}):"]
        lines += [f"  {name:<18} {size / GIB:9.2f} GiB" for name, size in rows]
        lines.append(f"  {'GPU memory':<18} {self.gpu_bytes / GIB:9.2f} GiB")
        if not self.fits:
            lines.append(
                f"warning: the run needs about {self.total / GIB:.1f} GiB per GPU and the GPU has "
                f"{self.gpu_bytes / GIB:.1f} GiB; it will not fit. Use a lora: block, gradient_checkpointing: true, "
                "a smaller vllm_options.gpu_memory_utilization or batch_size, or a smaller model.")
        return "\n".join(lines)


def _activations(shape: ModelShape, tokens: int, checkpointing: bool, bf16: bool) -> int:
    size = 2 if bf16 else 4
    full_layer = tokens * shape.hidden * ACTIVATION_BYTES_PER_UNIT * size // 2
    if checkpointing:
        return tokens * shape.hidden * shape.layers * size + full_layer
    return full_layer * shape.layers


def _share(n: int, world_size: int) -> int:
    return -(-n // world_size)


def _gathered(config: PPOConfig, policy: ModelShape) -> int:
    """Bytes of the sharded policy held whole at once (see the module docstring)."""
    size = 2 if config.dtype == "bf16" else 4
    if config.rollout_engine == "hf":
        return policy.params * size
    return _share(policy.params, policy.layers) * size


def plan_ppo(config: PPOConfig, policy: ModelShape, critic: ModelShape | None, reward: ModelShape | None,
             world_size: int, gpu_bytes: int, sharded: bool = False) -> MemoryPlan:
    """The plan of `config` for these model shapes (critic None: the policy_head value head;
    reward None: a reward function instead of a model; sharded: FSDP over world_size GPUs)."""
    lora, critic_lora = config.lora, config.critic_lora_settings()
    if sharded and (lora is not None or config.critic_lora is not None):
        raise CaiError("lora: LoRA runs on one device or data-parallel (DDP) processes, not under FSDP; plan it "
                       "without --fsdp (each GPU holds the whole frozen base)")
    trainable, frozen = 0, 0
    if lora is None:
        trainable += policy.params
        frozen += policy.params  # the reference copy
    else:
        trainable += policy.lora_params(lora)
        frozen += policy.params
    if critic is None:
        trainable += policy.hidden + 1
    elif critic_lora is None:
        trainable += critic.params
    else:
        trainable += critic.lora_params(critic_lora) + critic.hidden + 1  # adapters + the score head in full
        frozen += critic.params
    critic_holds_reward = critic is not None and config.critic_holds_reward_model()
    frozen += reward.params if reward is not None and not critic_holds_reward else 0
    tokens = config.batch_size * (config.max_prompt_tokens + config.max_new_tokens)
    bf16 = config.dtype == "bf16"
    activations = _activations(policy, tokens, config.gradient_checkpointing, bf16)
    activations += config.batch_size * config.max_new_tokens * policy.vocab * 4 * 2
    if critic is not None:
        activations += _activations(critic, tokens, config.gradient_checkpointing, bf16)
    vllm = 0
    if config.rollout_engine == "vllm":
        vllm = int(float(config.vllm_options.get("gpu_memory_utilization", 0.3)) * gpu_bytes)
    held = _share(trainable, world_size) if sharded else trainable  # trainable parameters whose state this GPU holds
    return MemoryPlan(world_size=world_size, sharded=sharded, gpu_bytes=gpu_bytes,
                      weights=4 * held + FROZEN_BYTES * frozen, grads=4 * held, optimizer=8 * held, vllm=vllm,
                      activations=activations, gathered=_gathered(config, policy) if sharded else 0,
                      trainable_params=trainable, frozen_params=frozen)


def model_shape(path: str | Path) -> ModelShape:
    """The shape of a model from its config.json alone: the model is built on the meta device (no
    weights read, no memory used)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cai.engines.hf import model_not_found

    local_only = not Path(path).is_dir()
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise model_not_found(str(path), e) from e
    with torch.device("meta"):
        model: Any = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    out = model.get_output_embeddings()
    head = next((n for n, m in model.named_modules() if m is out), None)
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return ModelShape(params=sum(p.numel() for p in model.parameters()), hidden=text.hidden_size,
                      layers=text.num_hidden_layers, vocab=text.vocab_size, linears=linears, output_head=head)
