"""Fault suite for the stores: kill -9 at seeded random points, a full disk, concurrent writers.

Each case ends the same way: after the fault and a rerun, the output holds every row exactly
once with the content an uninterrupted run writes (0 lost, 0 duplicated).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from store_writer import make_row

WRITER = Path(__file__).with_name("store_writer.py")


def writer_cmd(out: Path, n: int, *extra: str) -> list[str]:
    return [sys.executable, str(WRITER), str(out), str(n), *extra]


def expected_lines(n: int, payload: int) -> list[str]:
    return [make_row(i, payload).model_dump_json() for i in range(n)]


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_kill_at_a_random_point_then_resume_loses_and_repeats_nothing(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    n, payload = 40, rng.choice([20, 3000, 70000])  # large rows make a kill inside a write more likely
    out = tmp_path / "out.jsonl"
    for last in (15, n - 2):  # two kills in a row, the second one during the resumed run
        before = complete_lines(out)
        kill_after = rng.randint(before + 1, max(before + 1, last))
        proc = subprocess.Popen(writer_cmd(out, n, "--payload", str(payload), "--every-ms", "20"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while complete_lines(out) < kill_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert proc.poll() is None, "the writer finished before the kill point"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if rng.random() < 0.5:  # and power was lost mid-row: a torn last line
            with out.open("a") as f:
                f.write(make_row(n - 1, payload).model_dump_json()[: rng.randint(1, 40)])
    done = subprocess.run(writer_cmd(out, n, "--payload", str(payload)), check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert lines_of(out) == expected_lines(n, payload)


def test_concurrent_writers_write_each_row_once(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    procs = [subprocess.Popen(writer_cmd(out, 30, "--every-ms", "2"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert any(rc == 0 for rc, _ in results)
    for rc, err in results:
        assert rc == 0 or (rc == 1 and "is already in use by pid" in err), err
    assert lines_of(out) == expected_lines(30, 20)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 KiB tmpfs; skipped where this process may not mount one (needs root / CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a small tmpfs to fill up here ({e}); the disk-full case needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True, timeout=30)


def test_disk_full_keeps_whole_rows_says_so_and_a_rerun_completes(small_disk: Path) -> None:
    out = small_disk / "out.jsonl"
    n, payload = 100, 1500  # ~150 KB of rows for a 64 KiB disk
    full = subprocess.run(writer_cmd(out, n, "--payload", str(payload)), check=False, capture_output=True, text=True, timeout=120)
    assert full.returncode == 1
    err = full.stderr.strip()
    kept = complete_lines(out)
    assert 0 < kept < n
    assert "Traceback" not in err and "\n" not in err
    assert f"{out}: the disk is full. The {kept} complete rows already written are kept" in err
    assert "rerun the same command" in err
    assert out.read_bytes().endswith(b"\n")  # no partial row left behind
    assert lines_of(out) == expected_lines(n, payload)[:kept]

    again = subprocess.run(writer_cmd(out, n, "--payload", str(payload)), check=False, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and f"the {kept} rows in {out} are kept" in again.stderr  # still full: nothing lost
    assert complete_lines(out) == kept

    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True, timeout=30)
    done = subprocess.run(writer_cmd(out, n, "--payload", str(payload)), check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert lines_of(out) == expected_lines(n, payload)
    assert json.loads((small_disk / "out.jsonl.meta.json").read_text())["stage"] == "writer"
    assert not os.path.exists(small_disk / "out.jsonl.lock")
