"""LoRA adapters (peft) for the reward, SFT and PPO trainers.

Why: a 7-8B policy does not fit one GPU when every weight trains (16 bytes per parameter with
AdamW); with LoRA the base stays frozen (2 bytes per parameter in bf16) and only the adapters carry
gradients and optimizer state. Three rules make it safe to use:
- a head that a trainer adds (the reward model's `score`, PPO's value head) trains in full beside
  the adapters and is saved with them: a LoRA reward model that loses its head on save scores with
  a random one;
- checkpoints hold the adapters (and such heads) only, in peft's safetensors format; resume loads
  them back into the same frozen base, so resume stays exact;
- final/ holds the merged model (base + B A * alpha / r), which plain transformers and vLLM load
  as is; the vLLM rollout engine receives merged weights, under the base model's own names, before
  each rollout.
In PPO the reference policy is the policy with its adapter turned off (`disable_adapter`): no
second copy of the model, and exactly the base model's numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from cai.train.config import LoraSettings


def is_lora(model: Any) -> bool:
    """True for a peft model (possibly wrapped by DDP, whose `.module` is the model)."""
    from peft import PeftModel

    return isinstance(getattr(model, "module", model), PeftModel)


def add_lora(model: Any, settings: LoraSettings, full: tuple[str, ...] = ()) -> Any:
    """`model` with LoRA adapters on `settings.target_modules` (its own weights frozen); modules named
    in `full` (a score head) train in full and are saved with the adapters."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, modules_to_save=list(full) or None)
    return get_peft_model(model, config)


def base_of(model: Any) -> Any:
    """The transformers model inside a peft model (its layers carry the adapters), else the model."""
    return model.get_base_model() if is_lora(model) else model


@contextlib.contextmanager
def adapter_off(model: Any) -> Iterator[None]:
    """The base model's forward pass, exactly: LoRA layers skip their adapters inside the block."""
    inner = getattr(model, "module", model)
    with inner.disable_adapter():
        yield


def merged_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight as the plain base model names it, with the adapters merged
    in (W + delta); for a model without LoRA, its parameters as they are (sharded ones gathered,
    one at a time). Nothing is modified."""
    if not is_lora(model):
        from cai.train.fsdp import full_tensor

        yield from ((name, full_tensor(p.detach())) for name, p in model.named_parameters())
        return
    from peft.tuners.lora import LoraLayer

    base = base_of(getattr(model, "module", model))
    adapted = set()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            adapted.add(name)
            weight = module.base_layer.weight.detach()
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            yield f"{name}.weight", weight + delta.to(weight.dtype)
            if getattr(module.base_layer, "bias", None) is not None:
                yield f"{name}.bias", module.base_layer.bias.detach()
    for name, p in base.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if "lora_" in name or ".original_module." in name or any(owner == a or owner.startswith(a + ".") for a in adapted):
            continue  # adapters, the untrained copy of a head trained in full, layers merged above
        yield name.replace(".modules_to_save.default.", "."), p.detach()


def merge_for_export(model: Any) -> Any:
    """The plain transformers model with the adapters merged in (in place: call it last)."""
    inner = getattr(model, "module", model)
    return inner.merge_and_unload() if is_lora(inner) else inner
