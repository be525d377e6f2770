"""Executors run a data stage's fixed batches (see base.py) and stream the rows back to the driver.

`local` runs them in this process; `ray` runs them on Ray actors (one engine each) on one machine
or a cluster. Either way the driver is the only writer: `drive` appends every row of every batch
result to the stage's one JsonlStore, skipping ids already there, so a crash of a worker or of the
driver loses nothing and duplicates nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from cai.errors import CaiError
from cai.executors.base import Batch, BatchResult, EngineInfo, WorkerSpec, WorkerStats, plan_batches
from cai.store import JsonlStore

R = TypeVar("R", bound=BaseModel)

__all__ = ["Batch", "Executor", "ExecutorSettings", "RunStats", "drive", "open_executor", "plan_batches"]


class Executor(Protocol):
    def engine_info(self) -> EngineInfo: ...

    def results(self, batches: list[Batch]) -> Iterator[BatchResult]: ...

    def close(self) -> None: ...


class ExecutorSettings(BaseModel):
    """Where a data stage runs. Not part of the output's fingerprint: rows do not depend on it."""

    model_config = ConfigDict(extra="forbid")

    executor: Literal["local", "ray"] = Field("local", description="local: this process; ray: Ray actors")
    ray_address: str | None = Field(
        None, description="None: start a local Ray; 'auto': the running cluster; or ray://host:port")
    ray_workers: int = Field(1, ge=1, description="Ray actors, each with its own engine")
    ray_gpus_per_worker: float = Field(0.0, ge=0.0, description="GPUs per actor (vLLM: = tensor_parallel_size)")
    ray_cpus_per_worker: int = Field(1, ge=1, description="CPUs per actor; Ray also sets its torch threads to this")

    def executor_settings(self) -> ExecutorSettings:
        return ExecutorSettings.model_validate({k: getattr(self, k) for k in ExecutorSettings.model_fields})


def open_executor(settings: ExecutorSettings, spec: WorkerSpec) -> Executor:
    """The executor the settings name. A spec carrying an engine already loaded in this process
    only runs locally: Ray actors build their own from the config."""
    if settings.executor == "local":
        from cai.executors.local import LocalExecutor

        return LocalExecutor(spec)
    if getattr(spec, "engine", None) is not None or getattr(spec, "policy_engine", None) is not None:
        raise CaiError("executor ray builds one engine inside each Ray worker and cannot use an engine "
                       "loaded in this process; leave the engine to the config (model, engine, engine_options).")
    from cai.executors.ray import RayExecutor

    return RayExecutor(spec, settings)


class RunStats(BaseModel):
    """What the driver saw: rows written now, rows written with an error flag, per-worker totals."""

    written: int = 0
    errors: int = 0
    tokens: int = 0
    workers: list[WorkerStats] = Field(default_factory=list)


def drive(executor: Executor, batches: list[Batch], store: JsonlStore, bar: tqdm) -> RunStats:
    """Submit the batches, append each result's rows not yet in the store as it arrives (in any
    order), and keep the progress bar at rows/s and tok/s across all workers."""
    by_index = {b.index: b for b in batches}
    pending = {b.index: sum(rid not in store for rid in b.ids) for b in batches}
    stats, workers = RunStats(), {}
    start = time.perf_counter()
    for result in executor.results(batches):
        expected = set(by_index[result.index].ids)
        for record in result.records:
            rid = record.id  # type: ignore[attr-defined]
            if rid not in expected:
                raise CaiError(f"a worker returned row {rid}, which batch {result.index} does not hold: the "
                               "workers' model or config differs from the driver's; check that every node "
                               "sees the same files and package version.")
            if rid not in store:
                store.append(record)
                stats.written += 1
        stats.errors += result.errors
        stats.tokens += result.tokens
        workers.setdefault(result.worker, WorkerStats(worker=result.worker)).add(result)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.update(pending[result.index])
        bar.set_postfix(rows_s=f"{stats.written / elapsed:.2f}", tok_s=f"{stats.tokens / elapsed:.1f}")
    stats.workers = sorted(workers.values(), key=lambda w: w.worker)
    return stats


def run_into(executor: Executor, batches: list[Batch], store: JsonlStore[R], desc: str, unit: str,
             progress: bool) -> tuple[list[R], RunStats, int]:
    """The driver's whole job for one stage run: skip the batches whose rows are all in `store`, drive
    the rest, and return (this run's rows as now stored, the stats, how many rows were there before)."""
    run_ids = {rid for b in batches for rid in b.ids}
    skipped = len(run_ids & store.ids)
    with store:
        bar = tqdm(total=len(run_ids), initial=skipped, desc=desc, unit=unit, disable=not progress)
        stats = drive(executor, [b for b in batches if not all(rid in store for rid in b.ids)], store, bar)
        bar.close()
        records = [r for r in store.records() if r.id in run_ids]  # type: ignore[attr-defined]
    return records, stats, skipped
