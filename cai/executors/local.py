"""The in-process executor, and `run_batch`: the one function that turns a fixed batch into rows,
used by every executor (here and in each Ray actor)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from cai.errors import CaiError
from cai.executors.base import Batch, BatchResult, BatchRunner, EngineInfo, WorkerSpec


def run_batch(runner: BatchRunner, batch: Batch, worker: str) -> BatchResult:
    """Run one batch whole. A batch that raises a CaiError (a row the engine refuses: too long,
    empty, ...) is rerun item by item, and an item that fails on its own is written once with an
    error flag, so a bad row neither sinks its batch nor gets retried forever. Both steps are
    deterministic, so a resume or another executor reproduces them. Any other exception is a crash:
    it propagates and the run resumes from what was written."""
    before, start = runner.tokens, time.perf_counter()
    errors = 0
    try:
        records = runner.run(batch.items)
    except CaiError:
        records, errors = _one_by_one(runner, batch.items)
    return BatchResult(index=batch.index, records=records, tokens=runner.tokens - before,
                       seconds=time.perf_counter() - start, worker=worker, errors=errors)


def _one_by_one(runner: BatchRunner, items: list[Any]) -> tuple[list[BaseModel], int]:
    records: list[BaseModel] = []
    errors = 0
    for item in items:
        try:
            records += runner.run([item])
        except CaiError as e:
            failed = runner.failed(item, str(e))
            records += failed
            errors += len(failed)
    return records, errors


class LocalExecutor:
    """Runs the batches one after another in this process, with one engine."""

    def __init__(self, spec: WorkerSpec):
        self.runner = spec.open()

    def engine_info(self) -> EngineInfo:
        return self.runner.engine_info()

    def results(self, batches: list[Batch]) -> Iterator[BatchResult]:
        for batch in batches:
            yield run_batch(self.runner, batch, "local")

    def close(self) -> None:
        """Nothing to release: the engine belongs to whoever passed it in (or to this process)."""
