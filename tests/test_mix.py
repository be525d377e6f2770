"""The mix stage: declared ratios and counts are exact, seeds reproduce, AI labels are oriented, files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cai.cli import main
from cai.errors import CaiError, InputError
from cai.stages.mix import MixConfig, mix_counts, run_mix


def ai_rows(n: int) -> list[dict]:
    """Rows shaped like `cai label` output: label_prob = P(A better), alternating sides."""
    rows = []
    for i in range(n):
        p = 0.9 if i % 2 == 0 else 0.2
        rows.append({"id": f"ai{i}", "prompt": [{"role": "user", "content": f"harmful q{i}"}],
                     "response_a": f"refuse {i}", "response_b": f"comply {i}", "label_prob": p})
    return rows


def human_rows(n: int) -> list[dict]:
    return [{"chosen": f"\n\nHuman: helpful q{i}\n\nAssistant: good answer {i}",
             "rejected": f"\n\nHuman: helpful q{i}\n\nAssistant: bad answer {i}"} for i in range(n)]


@pytest.fixture()
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    ai, human = tmp_path / "ai.jsonl", tmp_path / "human.jsonl"
    ai.write_text("".join(json.dumps(r) + "\n" for r in ai_rows(40)))
    human.write_text("".join(json.dumps(r) + "\n" for r in human_rows(100)))
    return ai, human


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ratio_uses_as_many_rows_as_fit_and_split_keeps_it(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    ai, human = inputs
    summary = run_mix(MixConfig(ai=[ai], human=[human], out=tmp_path / "mix", ratio=0.25, test_size=0.1, seed=3))
    # 40 AI rows at 25% -> 160 rows, but only 100 human: N = 133 -> floor(33.25) = 33 AI + 100 human
    assert summary.counts == {"train": {"ai-harmless": 30, "human-helpful": 90},
                              "test": {"ai-harmless": 3, "human-helpful": 10}}
    train, test = read(tmp_path / "mix" / "train.jsonl"), read(tmp_path / "mix" / "test.jsonl")
    assert len(train) == 120 and len(test) == 13
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in test)
    assert set(train[0]) == {"id", "prompt", "chosen", "rejected", "label_prob", "source"}
    meta = json.loads((tmp_path / "mix" / "mix.json").read_text())
    assert meta["seed"] == 3 and meta["ratio"] == 0.25
    assert meta["inputs"][0] == {"path": str(ai), "sha256": hashlib.sha256(ai.read_bytes()).hexdigest(),
                                 "source": "ai-harmless", "rows": 40}


@pytest.mark.parametrize(("n_ai", "n_human", "ratio", "want"), [
    (40, 100, 0.5, (40, 40)), (40, 100, 0.25, (33, 100)), (10, 3, 0.5, (3, 3)), (7, 9, 0.0, (0, 9)),
    (7, 9, 1.0, (7, 0)), (30, 30, 0.1, (3, 30)), (30, 27, 0.1, (3, 27)), (0, 5, 0.5, (0, 0)), (100, 100, 0.29, (41, 100)), (3, 100, 0.5, (3, 3)),
])
def test_mix_counts(n_ai: int, n_human: int, ratio: float, want: tuple[int, int]) -> None:
    assert mix_counts(n_ai, n_human, ratio) == want


def test_exact_counts_and_same_seed_same_output(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    ai, human = inputs
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run_mix(MixConfig(ai=[ai], human=[human, human], out=tmp_path / name, ai_count=7, human_count=150,
                          test_size=0.2, seed=seed))
    a = (tmp_path / "a" / "train.jsonl").read_bytes() + (tmp_path / "a" / "test.jsonl").read_bytes()
    b = (tmp_path / "b" / "train.jsonl").read_bytes() + (tmp_path / "b" / "test.jsonl").read_bytes()
    c = (tmp_path / "c" / "train.jsonl").read_bytes() + (tmp_path / "c" / "test.jsonl").read_bytes()
    assert a == b and a != c
    rows = read(tmp_path / "a" / "train.jsonl") + read(tmp_path / "a" / "test.jsonl")
    assert sum(r["source"] == "ai-harmless" for r in rows) == 7
    assert sum(r["source"] == "human-helpful" for r in rows) == 150
    assert len(read(tmp_path / "a" / "test.jsonl")) == 1 + 30
    with pytest.raises(CaiError, match=r"--ai-count 41 asks for more rows than the ai inputs have \(40\)"):
        run_mix(MixConfig(ai=[ai], human=[human], out=tmp_path / "x", ai_count=41, human_count=1))


def test_ai_rows_are_oriented_and_human_rows_are_hard_labels(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    ai, human = inputs
    run_mix(MixConfig(ai=[ai], human=[human], out=tmp_path / "m", ai_count=40, human_count=5, test_size=0.0))
    rows = {r["id"]: r for r in read(tmp_path / "m" / "train.jsonl")}
    assert rows["ai0"]["chosen"] == [{"role": "assistant", "content": "refuse 0"}] and rows["ai0"]["label_prob"] == 0.9
    assert rows["ai1"]["chosen"] == [{"role": "assistant", "content": "comply 1"}]
    assert rows["ai1"]["label_prob"] == pytest.approx(0.8)
    assert rows["ai1"]["rejected"] == [{"role": "assistant", "content": "refuse 1"}]
    human_row = next(r for r in rows.values() if r["source"] == "human-helpful")
    assert human_row["label_prob"] == 1.0 and human_row["prompt"][0]["role"] == "user"
    assert human_row["chosen"][0]["content"].startswith("good answer")


def test_cli_mix_and_errors(inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ai, human = inputs
    assert main(["mix", "--ai", str(ai), "--human", str(human), "--out", str(tmp_path / "cli"), "--seed", "5"]) == 0
    assert "train: ai-harmless=36, human-helpful=36" in capsys.readouterr().out
    assert main(["mix", "--ai", str(ai), "--human", str(human), "--out", str(tmp_path / "x"), "--ratio", "0.5",
                 "--ai-count", "3", "--human-count", "3"]) == 1
    assert "either ratio or ai_count + human_count" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(human_rows(1)[0]) + "\n" + json.dumps({"chosen": "Human: x", "rejected": "y"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2: chosen: malformed HH transcript"):
        run_mix(MixConfig(ai=[ai], human=[bad], out=tmp_path / "y"))


def test_examples_helpful_pairs_parse(repo_root: Path) -> None:
    from cai.stages.pairs import read_human_pairs

    pairs, _ = read_human_pairs(repo_root / "examples" / "helpful_pairs.jsonl")
    assert len(pairs) >= 30
    assert len({p.prompt[0].content for p in pairs}) == len(pairs)
    assert all(p.chosen != p.rejected and p.label_prob == 1.0 for p in pairs)
    assert any([m.role for m in p.prompt] == ["user", "assistant", "user"] for p in pairs)  # multi-turn form too


def test_example_mix_config_loads(repo_root: Path) -> None:
    from cai.yamlio import load_model

    config = load_model(repo_root / "examples" / "mix.yaml", MixConfig)
    assert config.human == [Path("examples/helpful_pairs.jsonl")] and config.ratio == 0.5
