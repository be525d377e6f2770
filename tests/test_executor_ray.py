"""`--executor ray` on a local Ray instance (2 CPUs): same rows as a local run, a worker SIGKILLed
mid-run loses and duplicates nothing, a bad row is written once, a killed driver resumes.

Workers import the engines used here (tests/scripted.py, the composition-sensitive tiny engine of
test_executor_resume.py) through PYTHONPATH, which the Ray fixture sets to the tests folder.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from scripted import ScriptedEngine
from test_critique import CONSTITUTION
from test_executor import refuse_poison
from test_executor_resume import LABEL_CONSTITUTION, composition_sensitive_engine, content

from cai.engines import load_engine
from cai.errors import CaiError
from cai.records import SFTRecord
from cai.stages.critique import CritiqueConfig, run_critique
from cai.stages.label import LabelConfig, LabelRecord, run_label
from cai.store import JsonlStore

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).parent
PER_TEST_SECONDS = 120  # a hung Ray fails the test instead of the CI job


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def hard_timeout():
    def expire(*_):
        raise TimeoutError(f"Ray test still running after {PER_TEST_SECONDS}s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(PER_TEST_SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture()
def workdir(tmp_path: Path, repo_root: Path) -> Path:
    (tmp_path / "c.yaml").write_text(CONSTITUTION)
    (tmp_path / "label.yaml").write_text(LABEL_CONSTITUTION)
    (tmp_path / "few_shot.yaml").write_text((repo_root / "prompts" / "critique_revision.yaml").read_text())
    prompts = [f"how do I {'mend a fence ' * (i % 3)}for neighbour {i}?" for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    pairs = [{"prompt": p, "response_a": f"use nails, {i}", "response_b": "no idea"} for i, p in enumerate(prompts)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return tmp_path


def critique_config(workdir: Path, out: str, **kw) -> CritiqueConfig:
    base = {"prompts": workdir / "prompts.jsonl", "constitution": workdir / "c.yaml", "out": workdir / out,
            "rounds": 2, "batch_size": 2, "seed": 11, "max_new_tokens": 5}
    return CritiqueConfig(**(base | kw))


def ids_on_disk(path: Path) -> Counter:
    return Counter(json.loads(line)["id"] for line in path.read_text().splitlines())


@pytest.mark.parametrize(("temperature", "workers"), [(0.0, 1), (1.0, 2)], ids=["greedy", "sampled"])
def test_ray_rows_equal_local_rows(workdir: Path, tiny_model_dir: Path, temperature: float, workers: int) -> None:
    """Same ids and contents, whatever order they arrive in; the engine's numbers depend on batch
    composition, so this also checks that Ray runs exactly the local batches."""
    factory = functools.partial(composition_sensitive_engine, tiny_model_dir)
    cfg = {"model": str(tiny_model_dir), "temperature": temperature, "rounds": 1}
    run_critique(critique_config(workdir, "local.jsonl", **cfg), engine=factory(), progress=False)
    summary = run_critique(critique_config(workdir, "ray.jsonl", executor="ray", ray_workers=workers, **cfg),
                           engine_factory=factory, progress=False)
    assert content(workdir / "ray.jsonl", SFTRecord) == content(workdir / "local.jsonl", SFTRecord)
    assert set(ids_on_disk(workdir / "ray.jsonl").values()) == {1}
    assert sorted(w.worker for w in summary.workers) == [f"worker-{i}" for i in range(workers)]
    assert sum(w.rows for w in summary.workers) == 8


def test_ray_labels_equal_local_labels(workdir: Path, tiny_model_dir: Path) -> None:
    def cfg(out: str, **kw) -> LabelConfig:
        return LabelConfig(pairs=workdir / "pairs.jsonl", constitution=workdir / "label.yaml", out=workdir / out,
                           model=str(tiny_model_dir), batch_size=3, engine_options={"dtype": "float32"}, **kw)

    run_label(cfg("local.jsonl"), engine=load_engine("hf", str(tiny_model_dir), dtype="float32"), progress=False)
    run_label(cfg("ray.jsonl", executor="ray"), progress=False)  # the worker loads the model the config names
    assert content(workdir / "ray.jsonl", LabelRecord) == content(workdir / "local.jsonl", LabelRecord)


def _kill_worker_after(out: Path, rows: int, killed: list[int]) -> None:
    """Wait until `rows` rows are on disk, then SIGKILL the run's (only) Ray worker by its pid."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if out.exists() and len(out.read_text().splitlines()) >= rows:
            (name,) = [n for n in ray.util.list_named_actors() if n.endswith("worker-0")]
            pid = ray.get(ray.get_actor(name).pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.05)


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(workdir: Path) -> None:
    run_critique(critique_config(workdir, "local.jsonl"), engine=ScriptedEngine(), progress=False)
    out, killed = workdir / "ray.jsonl", []
    killer = threading.Thread(target=_kill_worker_after, args=(out, 2, killed))
    killer.start()
    summary = run_critique(critique_config(workdir, "ray.jsonl", executor="ray"), progress=False,
                           engine_factory=functools.partial(ScriptedEngine, delay=0.3))
    killer.join()
    assert len(killed) == 1, "the worker was not killed mid-run"
    assert summary.rows_written == 8
    assert set(ids_on_disk(out).values()) == {1} and len(ids_on_disk(out)) == 8
    assert content(out, SFTRecord) == content(workdir / "local.jsonl", SFTRecord)


def test_a_bad_row_on_ray_is_written_once_with_an_error_flag(workdir: Path) -> None:
    prompts = (workdir / "prompts.jsonl").read_text().splitlines()
    prompts[3] = json.dumps({"prompt": "poison"})
    (workdir / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    factory = functools.partial(ScriptedEngine, rules=[refuse_poison])
    run_critique(critique_config(workdir, "local.jsonl"), engine=factory(), progress=False)
    summary = run_critique(critique_config(workdir, "ray.jsonl", executor="ray"), engine_factory=factory,
                           progress=False)
    assert summary.rows_failed == 1 and summary.rows_written == 8
    assert content(workdir / "ray.jsonl", SFTRecord) == content(workdir / "local.jsonl", SFTRecord)
    assert [r["source_index"] for r in content(workdir / "ray.jsonl", SFTRecord).values() if r["flags"]["error"]] == [3]


def test_a_killed_driver_resumes_on_ray_to_the_local_rows(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_critique(critique_config(workdir, "local.jsonl"), engine=ScriptedEngine(), progress=False)
    append, written = JsonlStore.append, []

    def dies_after_three(self, record):
        if len(written) == 3:  # mid-way through batch 1 (rows 2-3)
            raise KeyboardInterrupt
        append(self, record)
        written.append(record.id)

    monkeypatch.setattr(JsonlStore, "append", dies_after_three)
    cfg = critique_config(workdir, "ray.jsonl", executor="ray", ray_workers=2)
    with pytest.raises(KeyboardInterrupt):
        run_critique(cfg, engine_factory=ScriptedEngine, progress=False)
    monkeypatch.setattr(JsonlStore, "append", append)
    summary = run_critique(cfg, engine_factory=ScriptedEngine, progress=False)
    assert (summary.rows_skipped, summary.rows_written) == (3, 5)
    assert set(ids_on_disk(workdir / "ray.jsonl").values()) == {1}
    assert content(workdir / "ray.jsonl", SFTRecord) == content(workdir / "local.jsonl", SFTRecord)


def test_a_worker_that_cannot_load_its_model_is_one_clear_error(workdir: Path) -> None:
    with pytest.raises(CaiError, match=r"Ray worker-0: cannot load model '/no/such/model'"):
        run_critique(critique_config(workdir, "ray.jsonl", executor="ray", model="/no/such/model"), progress=False)
    assert not (workdir / "ray.jsonl").exists()
