"""Preparing a model for training: dropout off, KV cache off, gradient checkpointing on request."""

from __future__ import annotations

import torch

from cai.train.config import TrainConfig


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: RM and PPO losses compare forward passes that must be deterministic."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def prepare_model(model: torch.nn.Module, config: TrainConfig) -> None:
    """Dropout off, KV cache off (training), gradient checkpointing if asked."""
    disable_dropout(model)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
