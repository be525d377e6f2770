"""`cai merge` on real shard outputs of the critique stage (scripted engine): the merge of the
shards equals the unsharded run, and every way a set of parts can be wrong stops it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from scripted import ScriptedEngine

from cai.cli import main
from cai.locking import lock_output
from cai.stages.critique import CritiqueConfig, run_critique

N_PROMPTS = 7


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"how do I do thing {i}?"}) + "\n" for i in range(N_PROMPTS)))
    return path


def generate(prompts: Path, out: Path, repo_root: Path, shard: str | None = None, **fields) -> Path:
    config = CritiqueConfig(prompts=prompts, constitution=repo_root / "constitutions" / "harmless.yaml", out=out,
                            rounds=1, batch_size=2, shard=shard, **fields)
    run_critique(config, engine=ScriptedEngine(), progress=False)
    return out


def rows_by_id(path: Path) -> dict[str, dict]:
    out = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        row["provenance"].pop("created_at")
        out[row["id"]] = row
    return out


def merge(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    rc = main(["merge", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def shards(tmp_path: Path, prompts: Path, repo_root: Path) -> list[Path]:
    return [generate(prompts, tmp_path / f"part{i}.jsonl", repo_root, shard=f"{i}/3") for i in range(3)]


def test_merged_shards_equal_the_unsharded_run(tmp_path: Path, prompts: Path, repo_root: Path,
                                               shards: list[Path], capsys: pytest.CaptureFixture) -> None:
    whole = generate(prompts, tmp_path / "whole.jsonl", repo_root)
    out = tmp_path / "merged.jsonl"
    rc, stdout, err = merge(capsys, *reversed(shards), "--out", out)
    assert rc == 0, err
    assert rows_by_id(out) == rows_by_id(whole)
    assert [json.loads(line)["source_index"] for line in out.read_text().splitlines()] == list(range(N_PROMPTS))
    assert f"{N_PROMPTS} rows, 0 duplicate ids written once, 0 of {N_PROMPTS} source rows missing" in stdout
    meta = json.loads((tmp_path / "merged.jsonl.meta.json").read_text())
    assert meta["config_hash"] == json.loads((tmp_path / "whole.jsonl.meta.json").read_text())["config_hash"]
    assert [p["shard"] for p in meta["merged_from"]] == ["2/3", "1/3", "0/3"]
    summary = json.loads((tmp_path / "merged.jsonl.merge.json").read_text())
    assert summary["rows_written"] == N_PROMPTS and summary["missing_rows"] == 0
    # the merged file is a finished output of the same run: resuming into it generates nothing
    again = run_critique(CritiqueConfig(prompts=prompts, constitution=repo_root / "constitutions" / "harmless.yaml",
                                        out=out, rounds=1, batch_size=2), engine=ScriptedEngine(), progress=False)
    assert (again.rows_written, again.rows_skipped) == (0, N_PROMPTS)


def test_parts_with_other_settings_are_refused(tmp_path: Path, prompts: Path, repo_root: Path,
                                               shards: list[Path], capsys: pytest.CaptureFixture) -> None:
    other = generate(prompts, tmp_path / "other.jsonl", repo_root, shard="1/3", seed=5)
    out = tmp_path / "merged.jsonl"
    rc, _, err = merge(capsys, shards[0], other, shards[2], "--out", out)
    assert rc == 1
    assert f"{other} was written with other settings than {shards[0]} (changed: seed)" in err
    assert not out.exists()


def test_a_missing_shard_is_named_and_refused_unless_allowed(tmp_path: Path, shards: list[Path],
                                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "merged.jsonl"
    rc, _, err = merge(capsys, shards[0], shards[2], "--out", out)
    assert rc == 1
    assert "2 of the 7 source rows" in err and "(source_index 1, 4)" in err and "1/3: 2 (no part given)" in err
    assert "Nothing was written" in err and not out.exists()
    rc, stdout, _ = merge(capsys, shards[0], shards[2], "--out", out, "--allow-incomplete")
    assert rc == 0 and "5 rows" in stdout and "2 of 7 source rows missing" in stdout
    assert json.loads((tmp_path / "merged.jsonl.merge.json").read_text())["missing_indices"] == [1, 4]


def test_a_killed_part_counts_its_unwritten_rows_as_missing(tmp_path: Path, shards: list[Path],
                                                            capsys: pytest.CaptureFixture) -> None:
    lines = shards[0].read_text().splitlines(keepends=True)
    shards[0].write_text(lines[0] + lines[1][:30])  # one row, then a torn one: the writer died mid-row
    out = tmp_path / "merged.jsonl"
    rc, _, err = merge(capsys, *shards, "--out", out)
    assert rc == 1 and "2 of the 7 source rows" in err and f"0/3: 2 ({shards[0].name})" in err
    rc, stdout, _ = merge(capsys, *shards, "--out", out, "--allow-incomplete")
    assert rc == 0 and f"{shards[0]} (shard 0/3): 1 rows (ends in a partial row" in stdout
    # a whole row without its newline is still a write cut short (resume drops it too)
    shards[0].write_text(lines[0] + lines[1].rstrip("\n"))
    rc, stdout, _ = merge(capsys, *shards, "--out", out, "--allow-incomplete", "--force")
    assert rc == 0 and "5 rows" in stdout and "1 rows (ends in a partial row" in stdout
    assert out.read_text().count("\n") == 5 and all(json.loads(x) for x in out.read_text().splitlines())


def test_input_file_decides_what_is_complete(tmp_path: Path, prompts: Path, shards: list[Path],
                                             capsys: pytest.CaptureFixture) -> None:
    longer = tmp_path / "longer.jsonl"
    longer.write_text(prompts.read_text() + json.dumps({"prompt": "one more?"}) + "\n")
    out = tmp_path / "merged.jsonl"
    rc, _, err = merge(capsys, *shards, "--out", out, "--input", longer)
    assert rc == 1 and f"1 of the 8 source rows of {longer}" in err and "(source_index 7)" in err
    rc, stdout, _ = merge(capsys, *shards, "--out", out, "--input", prompts)
    assert rc == 0 and "0 of 7 source rows missing" in stdout


def test_a_shard_given_twice_is_written_once(tmp_path: Path, shards: list[Path], capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "copy.jsonl"
    shutil.copy(shards[1], copy)
    shutil.copy(f"{shards[1]}.meta.json", f"{copy}.meta.json")
    out = tmp_path / "merged.jsonl"
    rc, stdout, _ = merge(capsys, *shards, copy, "--out", out)
    assert rc == 0 and "7 rows, 2 duplicate ids written once" in stdout
    summary = json.loads((tmp_path / "merged.jsonl.merge.json").read_text())
    assert summary["duplicate_examples"] == [json.loads(line)["id"] for line in copy.read_text().splitlines()]
    assert len(out.read_text().splitlines()) == N_PROMPTS


def test_same_id_with_other_content_is_refused(tmp_path: Path, shards: list[Path], capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "rerun.jsonl"
    rows = [json.loads(line) for line in shards[1].read_text().splitlines()]
    rows[0]["final_response"] += " (sampled differently)"
    copy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(f"{shards[1]}.meta.json", f"{copy}.meta.json")
    out = tmp_path / "merged.jsonl"
    rc, _, err = merge(capsys, *shards, copy, "--out", out)
    assert rc == 1 and f"1 ids appear in more than one part with different content (e.g. {rows[0]['id']}" in err
    assert "Nothing was written" in err and not out.exists()


def test_a_part_still_being_written_is_refused(tmp_path: Path, shards: list[Path], capsys: pytest.CaptureFixture) -> None:
    writer = lock_output(shards[2])
    try:
        rc, _, err = merge(capsys, *shards, "--out", tmp_path / "merged.jsonl")
    finally:
        writer.release()
    assert rc == 1 and f"{shards[2]} is already in use by pid" in err
    assert not (tmp_path / "merged.jsonl").exists()


def test_bad_part_lists_are_refused(tmp_path: Path, shards: list[Path], capsys: pytest.CaptureFixture) -> None:
    rc, _, err = merge(capsys, shards[0], shards[0], "--out", tmp_path / "m.jsonl")
    assert rc == 1 and "named twice" in err
    rc, _, err = merge(capsys, *shards, "--out", shards[0])
    assert rc == 1 and "is also a part" in err
    bare = tmp_path / "bare.jsonl"
    shutil.copy(shards[0], bare)
    rc, _, err = merge(capsys, shards[1], bare, "--out", tmp_path / "m.jsonl")
    assert rc == 1 and f"{bare} has no .meta.json fingerprint" in err
    (tmp_path / "m.jsonl").write_text("keep me\n")
    rc, _, err = merge(capsys, *shards, "--out", tmp_path / "m.jsonl")
    assert rc == 1 and "already exists; pass --force" in err and (tmp_path / "m.jsonl").read_text() == "keep me\n"


def test_label_shards_merge_without_a_completeness_check(tmp_path: Path, repo_root: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from cai.stages.label import LabelConfig, run_label

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q {i}?", "response_a": f"yes {i}", "response_b": f"no {i}"}) + "\n"
                             for i in range(5)))
    parts = []
    for i in range(2):
        out = tmp_path / f"labels{i}.jsonl"
        run_label(LabelConfig(pairs=pairs, constitution=repo_root / "constitutions" / "harmless.yaml", out=out,
                              shard=f"{i}/2"), engine=ScriptedEngine(), progress=False)
        parts.append(out)
    out = tmp_path / "labels.jsonl"
    rc, stdout, err = merge(capsys, *parts, "--out", out)
    assert rc == 0, err
    assert "5 rows" in stdout and "source rows not checked (stage label may skip inputs on purpose)" in stdout
    assert sorted(json.loads(line)["source_index"] for line in out.read_text().splitlines()) == [1, 2, 3, 4, 5]
    rc, _, err = merge(capsys, *parts, "--out", tmp_path / "other.jsonl", "--input", pairs)
    assert rc == 1 and "--input: completeness is checked for outputs of stages ['critique'], not 'label'" in err
