"""Generation backends behind one small interface (see base.Engine); `load_engine` picks one by name."""

from __future__ import annotations

import inspect
from typing import Any

from cai.engines.base import Engine, Generation, SamplingConfig
from cai.errors import CaiError

ENGINES = ("hf", "vllm")

__all__ = ["ENGINES", "Engine", "Generation", "SamplingConfig", "load_engine", "split_gpu_share"]

# vLLM's gpu_memory_utilization when none is given (VLLMEngine's default).
VLLM_DEFAULT_SHARE = 0.9


def split_gpu_share(name: str, options: dict[str, Any], engines: int) -> dict[str, Any]:
    """Engine options for one of `engines` engines alive in this process at once on the same GPUs.

    A vLLM engine reserves gpu_memory_utilization x the GPU's memory when it starts and fails when
    that much is not free, so engines that coexist each get an equal part of the configured share.
    Other engines allocate as they go and keep their options."""
    if name != "vllm" or engines <= 1:
        return dict(options)
    share = float(options.get("gpu_memory_utilization", VLLM_DEFAULT_SHARE))
    return {**options, "gpu_memory_utilization": round(share / engines, 4)}


def load_engine(name: str = "hf", model: str | None = None, **options: Any) -> Engine:
    """Build engine `name` for `model` (a local path or hub id; None = the bundled Gemma 3 270M).

    `options` go to the engine's constructor (both: max_length, overlong, model_id; hf: device,
    dtype, batch_size; vllm: gpu_memory_utilization, max_model_len, batch_invariant, tensor_parallel_size
    and any other vllm.LLM option).
    """
    if name not in ENGINES:
        raise CaiError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}")
    if model is None:
        from cai.default_model import DEFAULT_MODEL_ID, default_model_path

        model = str(default_model_path())
        options.setdefault("model_id", DEFAULT_MODEL_ID)
    if name == "hf":
        from cai.engines.hf import HFEngine as engine_class
    else:
        from cai.engines.vllm import VLLMEngine as engine_class  # type: ignore[assignment]
    params = inspect.signature(engine_class.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params) - {"self", "model"})
        if unknown:
            allowed = ", ".join(k for k in params if k not in ("self", "model"))
            raise CaiError(f"unknown option(s) for engine {name!r}: {', '.join(unknown)}; allowed: {allowed}")
    return engine_class(model, **options)
