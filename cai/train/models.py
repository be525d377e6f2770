"""Preparing a model for training: dropout off, KV cache off, gradient checkpointing on request; the
dtype of frozen weights, fp32 heads over them, and sparse gradients for a tied embedding."""

from __future__ import annotations

import torch

from cai.train.config import LoraSettings, TrainConfig


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: RM and PPO losses compare forward passes that must be deterministic."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def frozen_dtype(device: torch.device) -> str:
    """The dtype of weights no optimizer updates (PPO's reference and reward model, a LoRA base): bf16 on
    a GPU, half the memory of fp32; fp32 on a CPU, where bf16 matmuls are slow."""
    return "bfloat16" if device.type == "cuda" else "float32"


def load_dtype(lora: LoraSettings | None, device: torch.device) -> torch.dtype:
    """The dtype to load a model a trainer adapts in: with LoRA its weights are a frozen base
    (frozen_dtype), else every weight trains, in fp32."""
    return getattr(torch, frozen_dtype(device)) if lora is not None else torch.float32


def _cast_to_weight_dtype(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (args[0].to(module.weight.dtype), *args[1:])


def fp32_head(head: torch.nn.Module) -> None:
    """A head trained in full (a reward or value head) in fp32 over a base that may be bf16: its weights
    in fp32 and its input cast to fp32 (a forward pre-hook, which peft's trained copy of the head keeps),
    so the model's own forward runs whatever the base's dtype."""
    head.float()
    head.register_forward_pre_hook(_cast_to_weight_dtype)


def prepare_model(model: torch.nn.Module, config: TrainConfig) -> None:
    """Dropout off, KV cache off (training), gradient checkpointing if asked."""
    disable_dropout(model)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def sparse_tied_embedding_grad(model: torch.nn.Module) -> bool:
    """Make the input embedding's gradient sparse when its weight is the LM head's (tied, as in Gemma 3
    and Llama 3.2); returns whether it did.

    Why: with a tied weight, backward builds two dense [vocab, hidden] gradients (the LM head's and
    the embedding's) and then sums them, so a second full-size gradient exists at the peak (670 MB
    for Gemma 3 270M in fp32, ~1 GB for a 1B model). A sparse embedding gradient holds one row per
    input token and is added into the LM head's dense gradient, so the weight's gradient is the same
    sum, dense, and the second copy never exists. An untied embedding keeps its dense gradient
    (AdamW refuses sparse ones); a frozen one (LoRA) has none. Not for FSDP-sharded weights.
    """
    for m in model.modules():
        if not (hasattr(m, "get_input_embeddings") and hasattr(m, "get_output_embeddings")):
            continue
        inp, out = m.get_input_embeddings(), m.get_output_embeddings()
        tied = (isinstance(inp, torch.nn.Embedding) and out is not None and out.weight is inp.weight
                and inp.weight.requires_grad)
        if tied:
            inp.sparse = True
        return tied
    return False
