"""The store's integrity rules: one writer per output (a lock that names its holder and dies with
it), one row per id on read, resume and export, and the lock helper for training run directories."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from store_writer import Row, make_row

from cai.errors import CaiError
from cai.locking import InUseError, lock_run_dir, read_holder
from cai.records import SFTRecord
from cai.stages.export import export_stage_output
from cai.store import JsonlStore, read_records

WRITER = Path(__file__).with_name("store_writer.py")


def start_writer(out: Path, n: int, *extra: str) -> subprocess.Popen:
    """A writer process that has opened `out` (and so holds its lock) when this returns."""
    proc = subprocess.Popen([sys.executable, str(WRITER), str(out), str(n), *extra], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open", proc.stderr.read()
    return proc


def run_writer(out: Path, n: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WRITER), str(out), str(n), *extra], check=False, capture_output=True,
                          text=True, timeout=120)


def ids_in(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_second_process_on_same_output_stops_with_the_holders_pid(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    holder = start_writer(out, 5, "--hold")
    try:
        second = run_writer(out, 5)
        assert second.returncode == 1
        err = second.stderr.strip()
        assert f"{out} is already in use by pid {holder.pid} (started " in err
        assert "Wait for it or stop it" in err and "Traceback" not in err and "\n" not in err
        assert not out.exists() or out.read_text() == ""  # the second one wrote nothing
    finally:
        holder.communicate("go\n", timeout=60)
    assert holder.returncode == 0
    assert ids_in(out) == [make_row(i, 20).id for i in range(5)]
    assert not (tmp_path / "out.jsonl.lock").exists()  # released on close


def test_lock_of_a_killed_writer_does_not_block_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    holder = start_writer(out, 5, "--hold")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    lock = tmp_path / "out.jsonl.lock"
    assert read_holder(lock)["pid"] == holder.pid  # the dead process's lock file is still there
    rerun = run_writer(out, 5)
    assert rerun.returncode == 0, rerun.stderr
    assert len(ids_in(out)) == 5 and not lock.exists()


def test_same_output_twice_in_one_process_is_refused_until_closed(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    first = JsonlStore(out, Row, stage="writer", config={})
    with pytest.raises(InUseError, match=f"in use by pid {os.getpid()}"):
        JsonlStore(out, Row, stage="writer", config={})
    first.close()
    with JsonlStore(out, Row, stage="writer", config={}) as again:
        again.append(make_row(0, 5))
    assert len(ids_in(out)) == 1


def test_generate_and_label_refuse_a_busy_output_before_loading_a_model(tmp_path: Path, repo_root: Path) -> None:
    from cai.stages.critique import CritiqueConfig, run_critique
    from cai.stages.label import LabelConfig, run_label

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(3)))
    constitution = repo_root / "constitutions" / "harmless.yaml"
    no_model = str(tmp_path / "no-such-model")  # loading it would fail: the lock must be checked first
    out = tmp_path / "out.jsonl"
    holder = start_writer(out, 1, "--hold")
    try:
        with pytest.raises(CaiError, match=f"already in use by pid {holder.pid}"):
            run_critique(CritiqueConfig(prompts=prompts, constitution=constitution, out=out, model=no_model),
                         progress=False)
        with pytest.raises(CaiError, match=f"already in use by pid {holder.pid}"):
            run_label(LabelConfig(prompts=prompts, constitution=constitution, out=out, model=no_model),
                      progress=False)
    finally:
        holder.communicate("go\n", timeout=60)


def test_run_dir_lock_names_the_holder_and_is_released(tmp_path: Path) -> None:
    run = tmp_path / "rm-run"
    lock = lock_run_dir(run)
    assert (run / ".cai.lock").exists()
    with pytest.raises(InUseError, match=f"{run} is already in use by pid {os.getpid()}"):
        lock_run_dir(run)
    lock.release()
    assert not (run / ".cai.lock").exists()
    lock_run_dir(run).release()


def _file_with_repeats(path: Path) -> list[str]:
    """Rows 0,1,2 with rows 0 and 2 written twice (the second copies differ, as a racing writer's would)."""
    rows = [make_row(i, 10) for i in range(3)]
    again = [r.model_copy(update={"text": "second copy"}) for r in (rows[0], rows[2])]
    path.write_text("".join(r.model_dump_json() + "\n" for r in [rows[0], rows[1], again[0], rows[2], again[1]]))
    return [r.id for r in rows]


def test_readers_keep_the_first_row_of_each_id_and_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "out.jsonl"
    ids = _file_with_repeats(path)
    with caplog.at_level(logging.WARNING, logger="cai.store"):
        rows = read_records(path, Row)
    assert [r.id for r in rows] == ids
    assert all(r.text != "second copy" for r in rows)
    assert "dropped 2 row(s) whose id appeared earlier" in caplog.text and str(path) in caplog.text


def test_resume_rewrites_a_file_with_repeated_ids(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "out.jsonl"
    JsonlStore(path, Row, stage="writer", config={}).close()  # the fingerprint of an earlier run
    ids = _file_with_repeats(path)
    with caplog.at_level(logging.WARNING, logger="cai.store"), JsonlStore(path, Row, stage="writer", config={}) as store:
        assert store.ids == set(ids)
        store.append(make_row(3, 10))
    assert ids_in(path) == ids + [make_row(3, 10).id]
    assert "second copy" not in path.read_text()
    assert "dropped 2 row(s)" in caplog.text


def test_export_drops_repeated_ids_with_a_warning(tmp_path: Path, repo_root: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from scripted import ScriptedEngine

    from cai.stages.critique import CritiqueConfig, run_critique

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(3)))
    out = tmp_path / "sft.jsonl"
    config = CritiqueConfig(prompts=prompts, constitution=repo_root / "constitutions" / "harmless.yaml",
                            out=out, rounds=1)
    run_critique(config, engine=ScriptedEngine(), progress=False)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines + lines[:2]) + "\n")  # two rows written twice, as two racing runs did
    with caplog.at_level(logging.WARNING, logger="cai.store"):
        counts = export_stage_output(out, tmp_path / "export")
    assert counts["messages"] == 3
    assert "dropped 2 row(s)" in caplog.text
    assert len(read_records(out, SFTRecord)) == 3


def test_mix_reads_each_ai_row_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cai.stages.mix import MixConfig, read_ai_rows

    rows = [{"id": f"ai{i}", "prompt": [{"role": "user", "content": f"q{i}"}], "response_a": f"refuse {i}",
             "response_b": f"comply {i}", "label_prob": 0.9} for i in range(3)]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:1]))
    with caplog.at_level(logging.WARNING, logger="cai.store"):
        got, dropped = read_ai_rows(path, MixConfig(ai=[path], human=[path], out=tmp_path / "mix"))
    assert [r.id for r in got] == ["ai0", "ai1", "ai2"]
    assert dropped == []
    assert "dropped 1 row(s)" in caplog.text


def test_cai_run_refuses_a_run_dir_in_use(tmp_path: Path, repo_root: Path) -> None:
    from test_pipeline import pipeline_yaml

    from cai.pipeline import load_pipeline, run_pipeline

    pipeline = load_pipeline(pipeline_yaml(tmp_path, tmp_path / "no-model-needed", repo_root))
    other = lock_run_dir(tmp_path / "run")  # a `cai run` already working there
    try:
        with pytest.raises(InUseError, match=f"{tmp_path / 'run'} is already in use by pid {os.getpid()}"):
            run_pipeline(pipeline, progress=False, echo=lambda _: None)
    finally:
        other.release()
    assert not (tmp_path / "run" / "pipeline.json").exists()  # nothing ran
    with pytest.raises(Exception) as failed:  # any failure of the first stage (there is no model)
        run_pipeline(pipeline, progress=False, echo=lambda _: None)
    assert not isinstance(failed.value, InUseError)
    lock_run_dir(tmp_path / "run").release()  # a failed run let go of its run dir


def test_an_output_in_a_folder_without_write_permission_is_one_paragraph(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    mounted = False
    if os.access(folder, os.W_OK):  # root ignores permissions: try a read-only tmpfs instead
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(folder)],
                                 check=False, capture_output=True, timeout=30).returncode == 0
        if not mounted:
            pytest.skip("this user writes to read-only folders and cannot mount a read-only tmpfs")
    try:
        with pytest.raises(CaiError, match=r"ro/out.jsonl: cannot create its lock file .*Read-only file system"
                                           r"|ro/out.jsonl: cannot create its lock file .*Permission denied"):
            JsonlStore(folder / "out.jsonl", Row, stage="writer", config={})
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True, timeout=30)
        folder.chmod(0o700)
