"""The config fields every trainer shares, and loading a trainer's YAML config with its overrides.

Errors name the file and line of the bad field (or say that it came from a `--set` override), so a
user fixes a config from one paragraph.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cai.errors import CaiError
from cai.yamlio import data_with_overrides, load_yaml, parse_override, validation_errors


class LoraSettings(BaseModel):
    """LoRA adapters (peft) instead of full fine-tuning: the base weights stay frozen and only the
    low-rank adapters (and a reward or value head, in full) train."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling: the update is alpha / r * B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input (0 for RM and PPO)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]); all-linear = every linear layer "
        "but the output head")


class TrainConfig(BaseModel):
    """Fields every trainer shares; trainers subclass it and add their own (data, loss, ...)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="local model dir or hub id in the local cache; None = bundled Gemma 3 270M")
    out_dir: str = Field(description="where metrics, checkpoints/, final/ and summary.json go")
    seed: int = 0
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear warmup (optimizer steps); wins over warmup_ratio")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="warmup as a share of all steps")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/linear decay floor, as a share of lr")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1, description="rows per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global grad norm; None = off")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="bf16 = mixed precision, fp32 master weights")
    gradient_checkpointing: bool = False
    lora: LoraSettings | None = Field(None, description="train LoRA adapters instead of every weight")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = Field(0, ge=0, description="optimizer steps between evaluations; 0 = only at the end")
    save_every: int = Field(0, ge=0, description="optimizer steps between checkpoints; 0 = only at the end")
    log_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept on disk")
    plot: bool = Field(True, description="draw PNG curves at the end")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not 0 < self.adam_betas[0] < 1 or not 0 < self.adam_betas[1] < 1:
            raise ValueError("adam_betas must be in (0, 1)")
        return self

    def model_path(self) -> str:
        """The model to load: `model`, or the bundled default (converted once and cached)."""
        if self.model is not None:
            return self.model
        from cai.default_model import default_model_path

        return str(default_model_path())

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps or round(self.warmup_ratio * total_steps)


def parse_sets(items: Iterable[str] | None) -> dict[str, Any]:
    """`--set key=value` items -> overrides for load_train_config."""
    return dict(parse_override(i) for i in items or [])


def load_train_config(path: str | Path, cls: type[BaseModel], overrides: Mapping[str, Any] | None = None) -> Any:
    """Validate a YAML config (+ dotted overrides) into `cls`. Errors name file:line and the field;
    a bad value that came from an override says so."""
    doc = load_yaml(path)
    data = data_with_overrides(doc, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        errors = validation_errors(doc, err)
        set_keys = {k.split(".")[0] for k in overrides or {}}
        from_set = [bool(raw["loc"]) and raw["loc"][0] in set_keys for raw in err.errors()]
        if len(errors) == 1 and not from_set[0]:
            raise errors[0] from None
        parts = [
            f"{'--set' if s else f'{e.path}:{e.line}'}: {e.field}: {e.detail}" for e, s in zip(errors, from_set)
        ]
        raise CaiError(f"invalid config {doc.path}: " + "; ".join(parts)) from None
