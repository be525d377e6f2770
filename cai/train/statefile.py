"""Nested training state (optimizer and scheduler state_dicts, RNG states) saved without pickle:
tensors in a safetensors file, everything else in a JSON file beside it.

Why: a pickle file runs code when it is loaded, so a crafted `training_state.pt` in a run directory
would execute on `--resume`. Reading these two files only ever builds tensors, numbers, strings,
lists, tuples, dicts and numpy arrays.

Encoding of what JSON cannot say on its own: a tensor becomes {"__tensor__": key into the
safetensors file}, a tuple {"__tuple__": [...]}, a numpy array {"__ndarray__": [...], "dtype": ...},
and a dict whose keys are not all strings (optimizer state is keyed by parameter index)
{"__items__": [[key, value], ...]}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cai.errors import CaiError

_MARKERS = ("__tensor__", "__tuple__", "__ndarray__", "__items__")


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save {type(obj).__name__} in training state without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(stem: Path, obj: Any) -> None:
    """Write `obj` as stem.json + stem.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(obj, tensors)
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(doc) + "\n")


def load_state(stem: Path) -> Any:
    """Read what save_state wrote. A checkpoint that holds only the pickle file of an older cai
    (stem.pt) is refused: loading it could run code."""
    doc_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not doc_path.is_file() or not tensor_path.is_file():
        if stem.with_suffix(".pt").exists():
            raise CaiError(
                f"checkpoint {stem.parent} holds {stem.name}.pt, a pickle file (written by an older cai, or "
                "planted): cai does not load pickle because it can run code. Resume from a checkpoint written "
                "by this version, or start the run afresh in another out_dir (its weights load with "
                "`from_pretrained` as before)."
            )
        raise CaiError(f"checkpoint {stem.parent} is incomplete: {doc_path.name} or {tensor_path.name} is missing")
    return _decode(json.loads(doc_path.read_text()), load_file(str(tensor_path)))
