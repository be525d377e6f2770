"""The Ray executor: fixed batches on a pool of Ray actors, each holding one engine.

Why actors and not Ray Data's `map_batches`: a batch here is a unit whose composition must not
change (see base.py) and whose rows must reach the one writer as soon as it is done; Ray Data
re-blocks rows and owns the output, so it would either split our batches or hide when a batch is
durable. Plain actors give exactly that: the driver submits whole batches, collects each result
as it completes (`ray.wait`), and appends its rows to the store itself.

Faults: an actor that dies (a killed process, a lost node) is restarted by Ray, which rebuilds its
engine and retries the batches it held (`max_restarts`, `max_task_retries`). A batch result is
written only by the driver, only for ids not yet on disk, so a retried batch never writes a row
twice. A driver that dies loses only the batches in flight; the rerun submits the rest.
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from collections.abc import Iterator
from typing import Any

from cai.errors import CaiError
from cai.executors.base import Batch, BatchResult, EngineInfo, WorkerSpec
from cai.executors.local import run_batch

# Restarts of one actor (each rebuilds its engine) and retries of a batch whose actor died.
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
# Batches queued on each actor: one running, one waiting, so an actor never idles between batches.
IN_FLIGHT_PER_WORKER = 2
# The driver waits in slices this long: a blocking ray.wait/ray.get would hold off Ctrl-C and any
# other signal handler until a batch (or an engine load) is done.
POLL_SECONDS = 1.0


class BatchWorker:
    """One Ray actor: opens the stage (and its engine) once, then runs batch after batch."""

    def __init__(self, spec: WorkerSpec, name: str):
        self.name = name
        # A user error (a model path that does not exist on this node, a bad option) is kept and
        # raised by engine_info, so the driver prints it as itself rather than as a dead actor.
        self.runner, self.error = None, None
        try:
            self.runner = spec.open()
        except CaiError as e:
            self.error = str(e)

    def engine_info(self) -> EngineInfo:
        if self.runner is None:
            raise CaiError(f"Ray {self.name}: {self.error}")
        return self.runner.engine_info()

    def pid(self) -> int:
        return os.getpid()

    def run(self, batch: Batch) -> BatchResult:
        assert self.runner is not None, "engine_info reports a worker that failed to open"
        return run_batch(self.runner, batch, self.name)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise CaiError("--executor ray needs Ray: pip install 'cai[ray]' (on every node of the cluster)") from None
    return ray


class RayExecutor:
    """Starts (or joins) Ray, creates `ray_workers` actors and streams batch results back."""

    def __init__(self, spec: WorkerSpec, settings: Any):
        ray = self.ray = _import_ray()
        self.started_ray = False
        if not ray.is_initialized():
            try:
                ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=False,
                         logging_level="warning")
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"--ray-address {settings.ray_address}" if settings.ray_address else "a new local Ray"
                raise CaiError(f"cannot start or reach {where} ({e}). Start a cluster with "
                               "`ray start --head` (and `ray start --address=HEAD:6379` on the other nodes), "
                               "then pass --ray-address auto, or leave --ray-address out to start a local Ray.") from None
            self.started_ray = True
        actor = ray.remote(BatchWorker)
        run = uuid.uuid4().hex[:8]
        # Named (per run) so that `ray list actors` and the tests can find each worker.
        self.names = [f"cai-{run}-worker-{i}" for i in range(settings.ray_workers)]
        self.actors = [
            actor.options(name=name, num_cpus=settings.ray_cpus_per_worker, num_gpus=settings.ray_gpus_per_worker, max_restarts=MAX_RESTARTS,
                          max_task_retries=MAX_TASK_RETRIES).remote(spec, f"worker-{i}")
            for i, name in enumerate(self.names)
        ]

    def engine_info(self) -> EngineInfo:
        """Waits until every actor has built its engine; they must all report the same model."""
        infos = self._get([a.engine_info.remote() for a in self.actors])
        if len({(i.name, i.model_id) for i in infos}) != 1:
            raise CaiError(f"Ray workers loaded different models: {sorted({i.model_id for i in infos})}; every "
                           "node must see the same model files.")
        return infos[0]

    def results(self, batches: list[Batch]) -> Iterator[BatchResult]:
        queue, in_flight = deque(batches), {}

        def submit(actor: Any) -> None:
            if queue:
                in_flight[actor.run.remote(queue.popleft())] = actor

        for _ in range(IN_FLIGHT_PER_WORKER):  # round-robin, so a short job still uses every worker
            for actor in self.actors:
                submit(actor)
        while in_flight:
            ref = self._first_ready(list(in_flight), 1)[0]
            actor = in_flight.pop(ref)
            result = self._get(ref)
            submit(actor)
            yield result

    def _first_ready(self, refs: list[Any], n: int) -> list[Any]:
        """The first `n` of `refs` to finish, waiting in slices so signals get through."""
        while True:
            ready, _ = self.ray.wait(refs, num_returns=n, timeout=POLL_SECONDS)
            if len(ready) == n:
                return ready

    def _get(self, refs: Any) -> Any:
        """ray.get, with a CaiError raised in a worker (a bad config, a model that will not load)
        re-raised as itself and a worker dead past its restarts as one paragraph."""
        ray = self.ray
        many = isinstance(refs, list)
        self._first_ready(refs if many else [refs], len(refs) if many else 1)
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            if isinstance(getattr(e, "cause", None), CaiError):
                raise CaiError(str(e.cause)) from None
            raise
        except ray.exceptions.RayActorError as e:
            raise CaiError(f"a Ray worker died and could not be restarted ({str(e).splitlines()[0]}). Rows written "
                           "so far are kept; run the same command again to continue.") from None

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        if self.started_ray:
            self.ray.shutdown()
