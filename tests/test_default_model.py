"""The bundled default model cache: converted once, atomically (the real model: test_slow_gemma.py)."""

from __future__ import annotations

import json

import pytest

import cai.default_model as dm


def fake_convert(calls: list):
    def convert(out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / dm._MARKER).write_text(json.dumps({"fake": True}))

    return convert


def test_converts_once_then_returns_the_cached_copy(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(dm, "_convert", fake_convert(calls))
    first = dm.default_model_path(tmp_path)
    assert first == tmp_path / dm.MODEL_DIRNAME and (first / "config.json").is_file()
    assert dm.default_model_path(tmp_path) == first
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [dm.MODEL_DIRNAME]  # no temp dirs left


def test_cache_root_follows_cai_cache(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(dm, "_convert", fake_convert(calls))
    monkeypatch.setenv("CAI_CACHE", str(tmp_path / "c"))
    assert dm.default_model_path() == tmp_path / "c" / "models" / dm.MODEL_DIRNAME


def test_a_crash_mid_conversion_leaves_no_cache_behind(tmp_path, monkeypatch):
    def crash(out):
        (out / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        dm.default_model_path(tmp_path)
    assert list(tmp_path.iterdir()) == []

    calls: list = []
    monkeypatch.setattr(dm, "_convert", fake_convert(calls))
    (tmp_path / dm.MODEL_DIRNAME).mkdir()  # a folder without the completion marker is not trusted
    (tmp_path / dm.MODEL_DIRNAME / "junk").write_text("x")
    path = dm.default_model_path(tmp_path)
    assert len(calls) == 1 and not (path / "junk").exists()
