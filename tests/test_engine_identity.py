"""Stable model ids: the same model in two folders gets one id; a local path is never recorded."""

from __future__ import annotations

import shutil

from cai.engines.hf import HFEngine
from cai.engines.identity import stable_model_id


def test_same_model_in_two_folders_has_one_id_that_is_not_a_path(tiny_model_dir, tmp_path):
    copy = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(tiny_model_dir, copy)
    a, b = stable_model_id(tiny_model_dir), stable_model_id(copy)
    assert a == b and a.startswith("LlamaForCausalLM@sha256:")
    assert str(tmp_path) not in a and "my-model" not in a
    assert HFEngine(copy, device="cpu", dtype="float32").model_id == a


def test_different_weights_or_config_change_the_id(tiny_model_dir, tmp_path):
    base = stable_model_id(tiny_model_dir)
    grown = tmp_path / "grown"
    shutil.copytree(tiny_model_dir, grown)
    (grown / "model.safetensors").write_bytes((grown / "model.safetensors").read_bytes() + b"\0" * 8)
    assert stable_model_id(grown) != base
    edited = tmp_path / "edited"
    shutil.copytree(tiny_model_dir, edited)
    (edited / "config.json").write_text((edited / "config.json").read_text().replace("1024", "2048"))
    assert stable_model_id(edited) != base


def test_hub_ids_and_hub_cache_snapshots(tmp_path):
    assert stable_model_id("google/gemma-3-1b-it") == "google/gemma-3-1b-it"
    snap = tmp_path / "hub" / "models--google--gemma-3-1b-it" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert stable_model_id(snap) == "google/gemma-3-1b-it@abc123"


def test_two_fine_tunes_of_one_base_get_different_ids(tiny_model_dir, tmp_path):
    """SFT and PPO finals share config.json and every file size: only the weights' bytes tell them apart,
    and they must, or a labelling run of one would resume into the other's output."""
    import torch
    from safetensors.torch import load_file, save_file

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, tuned)
    weights = load_file(tuned / "model.safetensors")
    name = max(weights)
    weights[name] = weights[name] + 1e-3 * torch.ones_like(weights[name])  # a fine-tune's small step
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    assert (tuned / "model.safetensors").stat().st_size == (tiny_model_dir / "model.safetensors").stat().st_size
    assert stable_model_id(tuned) != stable_model_id(tiny_model_dir)
