"""What an executor runs: fixed batches of a data stage's input, and the worker that turns one batch
into rows.

Batches are fixed by row position: item i of the stage's input (after --limit) belongs to batch
i // batch_size, whatever is already on disk and whichever worker runs it. An engine whose numbers
depend on what else is in its batch (padding, shared prefixes, non-batch-invariant kernels)
therefore sees exactly the batch an uninterrupted run gave it, so a resumed run recomputes a
half-written batch whole and keeps only the rows not yet written: content-exact, not just id-exact.

Shards do not keep the global batch boundaries. Shard `i/n` holds every n-th item starting at i
(which items depend on n alone, never on the batch size, so machines of different sizes can pick
their own), and its j-th item belongs to its batch j // batch_size. A shard resumes exactly; the
shards together hold exactly the ids of the unsharded run, with contents equal up to the engine's
batch numerics (bit-equal only with a batch-invariant engine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from cai.stages.inputs import shard_indices


@dataclass(frozen=True)
class Batch:
    """One fixed batch: its number in the (shard's) plan, the ids of the rows it writes, and the
    stage's items (picklable: they travel to Ray workers)."""

    index: int
    ids: list[str]
    items: list[Any]


@dataclass
class BatchResult:
    """What a worker hands back for one batch."""

    index: int
    records: list[BaseModel]
    tokens: int
    seconds: float
    worker: str
    errors: int = 0  # rows written with an error flag


class WorkerStats(BaseModel):
    """Per-worker totals for the run summary: is every worker busy, and at what rate?"""

    worker: str
    batches: int = 0
    rows: int = 0
    tokens: int = 0
    busy_seconds: float = 0.0

    def add(self, result: BatchResult) -> None:
        self.batches += 1
        self.rows += len(result.records)
        self.tokens += result.tokens
        self.busy_seconds = round(self.busy_seconds + result.seconds, 3)

    def render(self) -> str:
        return (f"{self.worker}: {self.rows} rows in {self.batches} batches, {self.tokens} tokens, "
                f"busy {self.busy_seconds:.1f}s")


@dataclass
class EngineInfo:
    """What the driver needs to know about the workers' engine before it can compute row ids."""

    name: str
    model_id: str
    fingerprint: dict[str, Any] = field(default_factory=dict)  # engine_fingerprint: output-changing details


class BatchRunner(Protocol):
    """A stage bound to one engine, on one worker."""

    @property
    def tokens(self) -> int:
        """Tokens generated so far (a running total)."""
        ...

    def engine_info(self) -> EngineInfo: ...

    def run(self, items: list[Any]) -> list[BaseModel]:
        """The rows of one batch of items, computed together (one engine call per step)."""
        ...

    def failed(self, item: Any, error: str) -> list[BaseModel]:
        """The rows of an item that fails on its own: written once with an error flag."""
        ...


class WorkerSpec(Protocol):
    """A picklable recipe for a BatchRunner: each worker (process or Ray actor) opens it once, which
    loads the engine(s) the config names unless the spec carries engines already loaded in this
    process (local executor only)."""

    def open(self) -> BatchRunner: ...


def plan_batches(n_items: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> list[list[int]]:
    """The input positions of each batch of shard (i, n): batch k holds the shard's items
    [k*batch_size, (k+1)*batch_size), the shard's items being i, i+n, i+2n, ..."""
    items = shard_indices(n_items, shard)
    return [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
