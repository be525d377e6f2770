"""A model id that is the same on every machine: what provenance, row ids and fingerprints record.

Rule: a hub id stays as given ("google/gemma-3-1b-it"); a directory inside a Hugging Face cache
(`models--org--name/snapshots/<revision>`) is "org/name@<revision>"; any other local directory is
"<architecture>@sha256:<16 hex>" over its config.json bytes, the names and sizes of its weight
files and a sample of their bytes. A local path is never recorded: two machines holding the same
model in different folders must make the same row ids, and a renamed folder must not invalidate a run.

Why sample the bytes: two fine-tunes of one base (SFT and PPO `final/`) share config.json and every
file size, so names and sizes alone would give them one id and a run of one could resume into the
other's output. Hashing whole files costs a full read of tens of GB; instead every SAMPLE_STRIDE
bytes of each weight file contribute their first SAMPLE_BLOCK bytes (1/64 of the file). Any changed
region longer than SAMPLE_STRIDE + SAMPLE_BLOCK (every linear layer of a real model, so any full or
merged-LoRA fine-tune) is sure to be seen; a change confined to tiny tensors (only norms or biases)
may not be, and such a model should be given an explicit hub-style id.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
SAMPLE_STRIDE = 256 * 1024
SAMPLE_BLOCK = 4 * 1024


def _hash_sampled_bytes(h: Any, path: Path, size: int) -> None:
    """Feed the first SAMPLE_BLOCK bytes of every SAMPLE_STRIDE bytes of `path` (and its last block) to `h`."""
    with path.open("rb") as f:
        for offset in [*range(0, size, SAMPLE_STRIDE), max(0, size - SAMPLE_BLOCK)]:
            f.seek(offset)
            h.update(f.read(SAMPLE_BLOCK))


def _hub_cache_id(path: Path) -> str | None:
    """'org/name@revision' for .../models--org--name/snapshots/<revision>, else None."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/") + "@" + parts[-1]
    return None


def local_model_digest(path: Path) -> str:
    """'<architecture>@sha256:<16 hex>' of config.json and the weight files' names, sizes and sampled bytes."""
    h = hashlib.sha256()
    config = path / "config.json"
    architecture = "model"
    if config.is_file():
        raw = config.read_bytes()
        h.update(raw)
        try:
            archs = json.loads(raw).get("architectures") or []
            architecture = str(archs[0]) if archs else architecture
        except (ValueError, AttributeError):
            pass
    weights = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    for p in weights:
        size = p.stat().st_size
        h.update(f"\0{p.relative_to(path).as_posix()}\0{size}".encode())
        _hash_sampled_bytes(h, p, size)
    return f"{architecture}@sha256:{h.hexdigest()[:16]}"


def stable_model_id(model: str | Path) -> str:
    """The id to record for `model` (a local directory or a hub id), by the rule above."""
    path = Path(model)
    if not path.is_dir():
        return str(model)  # a hub id (resolved from the local cache by the engine)
    path = path.resolve()
    return _hub_cache_id(path) or local_model_digest(path)
