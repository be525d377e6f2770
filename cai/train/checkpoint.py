"""Checkpoints and exact resume.

Checkpoints are written into a temporary directory and renamed into place: a crash mid-save never
leaves a half-written checkpoint that `--resume` would pick up. Each one holds the model as
safetensors + tokenizer + config (loadable with `from_pretrained`) next to the training state
(optimizer, scheduler, RNG of every process, step and data position).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cai.errors import CaiError
from cai.train.statefile import load_state, save_state

CHECKPOINTS = "checkpoints"
FINAL = "final"
STATE_JSON = "trainer_state.json"
STATE = "training_state"  # .json + .safetensors (cai.train.statefile: no pickle)


class TrainState(BaseModel):
    """Where a run is: optimizer steps done and micro-batches consumed (the data position)."""

    model_config = ConfigDict(extra="forbid")

    step: int = 0
    micro_step: int = 0
    samples: int = 0
    elapsed_s: float = 0.0
    extra: dict[str, Any] = Field(default_factory=dict, description="trainer-specific state (e.g. KL controller)")


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_pretrained(accelerator: Any, model: torch.nn.Module, directory: Path, tokenizer: Any = None) -> None:
    """safetensors weights + config (+ tokenizer) that `from_pretrained` loads; gathers sharded
    (FSDP) weights first. A LoRA model writes its adapters and the heads trained in full beside them
    (peft's adapter_model.safetensors). Every process must call it; only the main one writes."""
    from cai.train.fsdp import full_state_dict, is_sharded

    state_dict = full_state_dict(model) if is_sharded(model) else accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


def save_final(accelerator: Any, model: torch.nn.Module, directory: Path, tokenizer: Any = None) -> None:
    """The trained model as plain transformers loads it: a LoRA model is merged first (in place, so
    this is the run's last use of it)."""
    from cai.train.lora import is_lora, merge_for_export

    if is_lora(accelerator.unwrap_model(model)):
        merged = merge_for_export(accelerator.unwrap_model(model))
        if accelerator.is_main_process:
            merged.save_pretrained(directory, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
        return
    save_pretrained(accelerator, model, directory, tokenizer)


def _load_adapters(model: Any, directory: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise CaiError(f"checkpoint {directory} does not match the model's adapters: unexpected {result.unexpected_keys[:5]}")


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load safetensors weights written by save_pretrained into `model` in place. Keys left out
    because they are tied to another parameter (e.g. lm_head = embeddings) are fine; anything
    else missing or unexpected is an error. A LoRA model loads its adapters and full heads; a sharded
    (FSDP) model keeps its own shard of each tensor."""
    from safetensors.torch import load_file

    from cai.train.fsdp import load_full_state_dict
    from cai.train.lora import is_lora

    if is_lora(model):
        _load_adapters(model, directory)
        return
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    missing, unexpected = load_full_state_dict(model, state)
    named = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(named[k]) for k in state if k in named}
    missing = [k for k in missing if id(named.get(k)) not in loaded]  # tied to a loaded parameter: fine
    if missing or unexpected:
        raise CaiError(
            f"checkpoint {directory} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under out_dir/checkpoints (half-written ones are .tmp-* dirs)."""
    root = Path(out_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / STATE_JSON).is_file()) if root.is_dir() else []
    return done[-1] if done else None


class Checkpointer:
    """Atomic checkpoints under out_dir/checkpoints/step-XXXXXXXX and exact resume.

    Layout of one checkpoint: the main model's safetensors + config + tokenizer at the top (so the
    directory loads with `from_pretrained` and `cai score`), other models in sub-directories named
    by their key, trainer_state.json (TrainState + the run's config), training_state.json/.safetensors
    (optimizer, scheduler and other state_dicts) and rng_state_<rank>.json/.safetensors per process;
    no pickle anywhere (cai.train.statefile).
    """

    def __init__(self, out_dir: str | Path, accelerator: Any, keep: int = 2):
        self.root = Path(out_dir) / CHECKPOINTS
        self.acc = accelerator
        self.keep = keep
        self.last: Path | None = self.latest()

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root.parent)

    def save(
        self,
        state: TrainState,
        model: torch.nn.Module,
        tokenizer: Any = None,
        stateful: Mapping[str, Any] | None = None,
        extra_models: Mapping[str, torch.nn.Module] | None = None,
        config: BaseModel | None = None,
    ) -> Path:
        """Write a checkpoint of `state.step` (all processes call this). `stateful` objects need
        state_dict(): optimizers, schedulers, controllers."""
        acc = self.acc
        final = self.root / f"step-{state.step:08d}"
        tmp = self.root / f".tmp-step-{state.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        save_pretrained(acc, model, tmp, tokenizer)
        for name, m in (extra_models or {}).items():
            save_pretrained(acc, m, tmp / name)
        blobs = {k: v.state_dict() for k, v in (stateful or {}).items()}
        if acc.is_main_process:
            save_state(tmp / STATE, blobs)
            meta = {"state": state.model_dump(), "config": config.model_dump(mode="json") if config else None}
            (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        save_state(tmp / f"rng_state_{acc.process_index}", _rng_state())
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(p for p in self.root.glob("step-*") if p != final)[: -self.keep + 1 or None]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.last = final
        return final

    def restore(
        self,
        path: Path,
        model: torch.nn.Module,
        stateful: Mapping[str, Any] | None = None,
        extra_models: Mapping[str, torch.nn.Module] | None = None,
    ) -> TrainState:
        """Load weights, state_dicts and this process's RNG state from a checkpoint; returns its TrainState."""
        meta = json.loads((path / STATE_JSON).read_text())
        load_weights(self.acc.unwrap_model(model), path)
        for name, m in (extra_models or {}).items():
            load_weights(self.acc.unwrap_model(m), path / name)
        blobs = load_state(path / STATE)
        for k, obj in (stateful or {}).items():
            if k not in blobs:
                raise CaiError(f"checkpoint {path} has no saved state for {k!r}")
            obj.load_state_dict(blobs[k])
        rng = path / f"rng_state_{self.acc.process_index}"
        if not any(rng.with_suffix(s).exists() for s in (".json", ".pt")):
            raise CaiError(f"checkpoint {path} was written by fewer processes than this run has; resume with the same setup")
        _set_rng_state(load_state(rng))
        self.last = path
        return TrainState.model_validate(meta["state"])


def resume_point(out_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run). A fresh run refuses to overwrite
    checkpoints of an earlier run in the same out_dir."""
    last = latest_checkpoint(out_dir)
    if resume and last is None:
        raise CaiError(f"--resume: no checkpoint under {Path(out_dir) / CHECKPOINTS}; run without --resume to start")
    if not resume and last is not None:
        raise CaiError(
            f"{out_dir} already holds checkpoints of a run ({last.name}); pass --resume to continue it, "
            "or choose another out_dir"
        )
    return last


def write_json(path: str | Path, obj: BaseModel | Mapping[str, Any]) -> None:
    """Write JSON atomically (tmp file + rename)."""
    p = Path(path)
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else dict(obj)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, p)
