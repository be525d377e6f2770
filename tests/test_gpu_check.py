"""benchmarks/gpu_check.py runs end to end on tiny configs on CPU, so it cannot rot before a GPU run."""

from __future__ import annotations

import importlib.util
import re

import pytest


@pytest.mark.usefixtures("one_thread")
def test_gpu_check_tiny_on_cpu_prints_every_figure(repo_root, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", repo_root / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "cpu", "--tiny"]) == 0
    figures = dict(re.findall(r"^RESULT (\S+) (\S+)$", capsys.readouterr().out, flags=re.MULTILINE))
    expected = {f"{kind}_{shape}" for kind in ("gen_ratio", "choice_pairs_s") for shape in ("gemma1b", "llama8b")}
    expected |= {"gen_tok_s_gemma1b_hf", "gen_tok_s_gemma1b_raw", "rm_samples_s", "rm_peak_mb", "ppo_step_s", "ppo_peak_mb"}
    assert expected <= set(figures) and not any(k.endswith("_failed") for k in figures)
    assert all(float(figures[k]) > 0 for k in expected)
