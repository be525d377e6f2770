"""Critique-revise stage: red-team prompts + a constitution -> revised SFT rows.

Per batch of prompts the engine sees whole batches: all initial responses, then round by round
all critiques and all revisions. Each row's randomness (its principles and every sampling seed)
is derived from the run seed and the row's own content, and batches are fixed by row position
(cai/executors/base.py), so a resumed run writes exactly the rows an uninterrupted run would,
and a Ray run exactly the rows of a local one.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cai import __version__
from cai.constitution import Constitution, Principle, load_constitution
from cai.conversation import Message, as_dicts
from cai.engines.base import Engine, Generation, SamplingConfig, engine_details, engine_fingerprint
from cai.errors import CaiError
from cai.executors import Batch, ExecutorSettings, RunStats, open_executor, run_into
from cai.executors.base import EngineInfo, WorkerStats, plan_batches
from cai.hashing import record_id, sha256_of
from cai.prompts import (
    CRITIQUE_PREFIX,
    REVISION_PREFIX,
    FewShotSet,
    critique_messages,
    load_few_shot,
    response_messages,
    revision_messages,
)
from cai.records import CritiqueStep, Flags, Provenance, SFTRecord
from cai.stages.copy_check import CopyCheck, few_shot_texts
from cai.stages.inputs import load_prompts, parse_shard, shard_spec
from cai.store import JsonlStore, SourcePlan, check_output

# A critique that says one of these (and no problem word) found nothing to fix.
_NOTHING_FOUND = re.compile(
    r"\b(no (problems?|issues?|concerns?|changes?)|nothing (wrong|harmful|to (fix|change|improve))|"
    r"(is|was|seems|looks) (fine|appropriate|harmless|helpful and harmless|safe)|does not need (any )?(changes?|revision))\b",
    re.IGNORECASE,
)


class CritiqueConfig(ExecutorSettings):
    """Settings of `cai generate` (also readable from a YAML config)."""

    model_config = ConfigDict(extra="forbid")

    prompts: Path = Field(description="JSONL (prompt / messages / HH transcript), .jsonl.gz, .json, .parquet, .csv or a saved dataset")
    constitution: Path
    out: Path
    model: str | None = Field(None, description="local path or hub id; None = the bundled Gemma 3 270M")
    engine: Literal["hf", "vllm"] = "hf"
    engine_options: dict[str, Any] = Field(default_factory=dict, description="passed to the engine constructor")
    rounds: int = Field(4, ge=1)
    max_new_tokens: int = Field(128, ge=1, description="for initial responses and revisions")
    critique_max_new_tokens: int | None = Field(None, ge=1, description="default: max_new_tokens")
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    batch_size: int = Field(16, ge=1, description="prompts per batch handed to the engine")
    seed: int = 0
    limit: int | None = Field(None, ge=1)
    shard: str | None = Field(None, description="i/n: process every n-th prompt starting at i")
    tags: list[str] | None = Field(None, description="only sample principles with one of these tags")
    with_replacement: bool = Field(True, description="a principle may be drawn again in a later round")
    force: bool = Field(False, description="move an output written with another config aside and start over")

    def fingerprint(self, constitution: Constitution, few_shot: FewShotSet, model_id: str) -> dict[str, Any]:
        """What determines a row's content; rows are keyed by it, resumes are checked against it."""
        return {
            "constitution_sha256": constitution.sha256,
            "few_shot_sha256": sha256_of(few_shot.model_dump(mode="json")),
            "model": model_id,
            "engine": self.engine,
            "rounds": self.rounds,
            "sampling": self.sampling_params(),
            "seed": self.seed,
            "tags": self.tags,
            "with_replacement": self.with_replacement,
        }

    def sampling_params(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "critique_max_new_tokens": self.critique_max_new_tokens or self.max_new_tokens,
        }


def sample_principles(
    principles: list[Principle], rounds: int, rng: random.Random, with_replacement: bool
) -> list[Principle]:
    """Draw one principle per round, proportionally to weight."""
    if with_replacement:
        return rng.choices(principles, weights=[p.weight for p in principles], k=rounds)
    if rounds > len(principles):
        raise CaiError(f"{rounds} rounds without replacement need at least {rounds} principles, have {len(principles)}")
    pool = list(principles)
    chosen = []
    for _ in range(rounds):
        pick = rng.choices(range(len(pool)), weights=[p.weight for p in pool], k=1)[0]
        chosen.append(pool.pop(pick))
    return chosen


def select_principles(constitution: Constitution, tags: list[str] | None) -> list[Principle]:
    principles = constitution.select(tags)
    if not principles:
        raise CaiError(f"no principle of {constitution.source_path} has any of the tags {tags}")
    return principles


def row_id(conversation: list[Message], config_hash: str) -> str:
    """A row's id: known from the prompt and the config alone, before anything is generated."""
    return record_id(as_dicts(conversation), config_hash)


def critique_found_nothing(critique: str) -> bool:
    return bool(_NOTHING_FOUND.search(critique))


def _row_seed(run_seed: int, conversation: list[Message]) -> int:
    return int(sha256_of([run_seed, as_dicts(conversation)])[:8], 16)


def _sub_seed(row_seed: int, what: str, round_index: int = 0) -> int:
    return int(sha256_of([row_seed, what, round_index])[:8], 16)


def _norm(text: str) -> str:
    return " ".join(text.split())


class _RowState:
    """A row being built across the calls of one batch."""

    def __init__(self, index: int, conversation: list[Message], rid: str, seed: int, principles: list[Principle]):
        self.index = index
        self.conversation = conversation
        self.id = rid
        self.seed = seed
        self.principles = principles
        self.initial: Generation | None = None
        self.response = ""
        self.steps: list[CritiqueStep] = []
        self.critiques: list[str] = []
        self.prompt_flags: set[str] = set()  # RowFlags of any of the row's generations


class CritiqueStage:
    """Runs the critique-revise rounds for batches of prompts with one engine."""

    def __init__(self, config: CritiqueConfig, engine: Engine, constitution: Constitution, few_shot: FewShotSet):
        self.config = config
        self.engine = engine
        self.constitution = constitution
        self.few_shot = few_shot
        self.principles = select_principles(constitution, config.tags)
        stop = tuple(engine.stop_sequences)
        self.response_sampling = SamplingConfig(
            temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
            stop=stop, seed=config.seed,
        )
        self.critique_sampling = self.response_sampling.model_copy(
            update={"max_new_tokens": config.critique_max_new_tokens or config.max_new_tokens}
        )
        self.fingerprint = {**config.fingerprint(constitution, few_shot, engine.model_id), **engine_fingerprint(engine)}
        self.config_hash = sha256_of(self.fingerprint)[:16]
        self.tokens = 0
        self.copy_check = CopyCheck(few_shot_texts(few_shot))

    def new_row(self, index: int, conversation: list[Message]) -> _RowState:
        seed = _row_seed(self.config.seed, conversation)
        rng = random.Random(seed)
        principles = sample_principles(self.principles, self.config.rounds, rng, self.config.with_replacement)
        return _RowState(index, conversation, row_id(conversation, self.config_hash), seed, principles)

    def engine_info(self) -> EngineInfo:
        return EngineInfo(name=self.engine.name, model_id=self.engine.model_id, fingerprint=engine_fingerprint(self.engine))

    def run(self, items: list[tuple[int, list[Message]]]) -> list[SFTRecord]:
        """The rows of one fixed batch of (input position, conversation) items."""
        return self.run_batch([self.new_row(i, conversation) for i, conversation in items])

    def failed(self, item: tuple[int, list[Message]], error: str) -> list[SFTRecord]:
        """A prompt the engine refuses even on its own: one row with no responses and the error."""
        r = self.new_row(*item)
        r.initial = Generation(text="", prompt_tokens=0, completion_tokens=0, finish_reason="stop")
        record = self._record(r)
        record.flags = Flags(empty=True, error=error)
        return [record]

    def _generate(self, rows: list[_RowState], prompts: list[str], sampling: SamplingConfig, seeds: list[int]
                  ) -> list[Generation]:
        gens = self.engine.generate(prompts, sampling, seeds=seeds)
        self.tokens += sum(g.completion_tokens for g in gens)
        for r, g in zip(rows, gens):
            if g.flag:
                r.prompt_flags.add(g.flag)
        return gens

    def run_batch(self, rows: list[_RowState]) -> list[SFTRecord]:
        """Initial responses for all rows, then each round's critiques and revisions for all rows."""
        render = self.engine.render_chat
        fs = self.few_shot
        prompts = [render(response_messages(fs, as_dicts(r.conversation))) for r in rows]
        for r, g in zip(rows, self._generate(rows, prompts, self.response_sampling, [_sub_seed(r.seed, "initial") for r in rows])):
            r.initial, r.response = g, g.text.strip()
        for k in range(self.config.rounds):
            prompts = [
                render(critique_messages(fs, as_dicts(r.conversation), r.response, r.principles[k]), CRITIQUE_PREFIX)
                for r in rows
            ]
            critiques = self._generate(rows, prompts, self.critique_sampling, [_sub_seed(r.seed, "critique", k) for r in rows])
            prompts = [
                render(
                    revision_messages(fs, as_dicts(r.conversation), r.response, r.principles[k], c.text.strip()),
                    REVISION_PREFIX,
                )
                for r, c in zip(rows, critiques)
            ]
            revisions = self._generate(rows, prompts, self.response_sampling, [_sub_seed(r.seed, "revision", k) for r in rows])
            for r, c, v in zip(rows, critiques, revisions):
                own = [m.content for m in r.conversation] + [r.initial.text if r.initial else "", r.response]
                r.steps.append(
                    CritiqueStep(
                        principle_id=r.principles[k].id, critique=c.text.strip(), revision=v.text.strip(),
                        critique_tokens=c.completion_tokens, revision_tokens=v.completion_tokens,
                        critique_finish=c.finish_reason, revision_finish=v.finish_reason,
                        copied_few_shot=self.copy_check.copied(v.text, own),
                    )
                )
                # An empty revision keeps the previous response rather than erasing it.
                if v.text.strip():
                    r.response = v.text.strip()
        return [self._record(r) for r in rows]

    def _record(self, r: _RowState) -> SFTRecord:
        assert r.initial is not None
        finishes = [r.initial.finish_reason] + [f for s in r.steps for f in (s.critique_finish, s.revision_finish)]
        flags = Flags(
            truncated="length" in finishes,
            empty=not r.response.strip(),
            revision_unchanged=_norm(r.response) == _norm(r.initial.text),
            critique_found_nothing=all(critique_found_nothing(s.critique) for s in r.steps),
            copied_few_shot=any(s.copied_few_shot for s in r.steps),
            prompt_too_long="prompt_too_long" in r.prompt_flags,
            empty_prompt="empty_prompt" in r.prompt_flags,
        )
        return SFTRecord(
            id=r.id,
            source_index=r.index,
            prompt=r.conversation,
            initial_response=r.initial.text.strip(),
            initial_tokens=r.initial.completion_tokens,
            initial_finish=r.initial.finish_reason,
            steps=r.steps,
            final_response=r.response,
            flags=flags,
            provenance=Provenance(
                constitution_name=self.constitution.name,
                constitution_sha256=self.constitution.sha256,
                principle_ids=[p.id for p in r.principles],
                model=self.engine.model_id,
                engine=self.engine.name,
                engine_details=engine_details(self.engine),
                seed=self.config.seed,
                sampling=self.config.sampling_params(),
                cai_version=__version__,
            ),
        )


class RunSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str
    rows_total: int
    rows_written: int
    rows_skipped: int
    rows_failed: int = 0  # written this run with an error flag
    flags: dict[str, int]
    principles: dict[str, int]
    generated_tokens: int
    wall_seconds: float
    tokens_per_second: float
    workers: list[WorkerStats] = Field(default_factory=list)

    def render(self) -> str:
        flags = ", ".join(f"{k}={v}" for k, v in self.flags.items()) or "none"
        principles = ", ".join(f"{k}={v}" for k, v in sorted(self.principles.items(), key=lambda kv: -kv[1]))
        workers = "".join(f"\n  {w.render()}" for w in self.workers)
        return (
            f"wrote {self.rows_written} rows to {self.out} ({self.rows_skipped} already there, {self.rows_total} in total"
            f"; {self.rows_failed} with an error flag)\n"
            f"flags: {flags}\nprinciples: {principles}\n"
            f"generated tokens: {self.generated_tokens} in {self.wall_seconds:.1f}s ({self.tokens_per_second:.1f} tok/s)"
            f"{workers}"
        )


class CritiqueWorker:
    """The critique stage as each worker opens it: picklable, so a Ray actor can receive it."""

    def __init__(self, config: CritiqueConfig, engine: Engine | None = None,
                 engine_factory: Callable[[], Engine] | None = None):
        self.config, self.engine, self.engine_factory = config, engine, engine_factory

    def open(self) -> CritiqueStage:
        from cai.engines import load_engine

        constitution = load_constitution(self.config.constitution)
        few_shot = load_few_shot(constitution.few_shot_path)
        engine = self.engine
        if engine is None:
            c = self.config
            engine = self.engine_factory() if self.engine_factory else load_engine(c.engine, c.model, **c.engine_options)
        return CritiqueStage(self.config, engine, constitution, few_shot)


def run_critique(config: CritiqueConfig, engine: Engine | None = None, progress: bool = True,
                 engine_factory: Callable[[], Engine] | None = None) -> RunSummary:
    """load -> critique-revise -> write. Resumes from `config.out` if it holds rows of the same config.

    `engine`: an engine already loaded in this process (local executor only); `engine_factory`: how
    each worker builds its engine instead of loading the config's (must pickle for Ray). The
    executor (config.executor) runs the batches; this process alone writes the output."""
    constitution = load_constitution(config.constitution)
    few_shot = load_few_shot(constitution.few_shot_path)
    select_principles(constitution, config.tags)  # a bad tag fails here, before any worker starts
    conversations = load_prompts(config.prompts, limit=config.limit)
    positions = plan_batches(len(conversations), config.batch_size, parse_shard(config.shard))
    check_output(config.out)  # fail in a second, not after loading a model
    executor = open_executor(config.executor_settings(), CritiqueWorker(config, engine, engine_factory))
    start = time.perf_counter()
    try:
        info = executor.engine_info()
        fingerprint = {**config.fingerprint(constitution, few_shot, info.model_id), **info.fingerprint}
        config_hash = sha256_of(fingerprint)[:16]
        batches = [Batch(k, [row_id(conversations[i], config_hash) for i in idx], [(i, conversations[i]) for i in idx])
                   for k, idx in enumerate(positions)]
        store = JsonlStore(config.out, SFTRecord, stage="critique", config=fingerprint, force=config.force,
                           source=SourcePlan(input=str(config.prompts), rows=len(conversations), shard=shard_spec(config.shard)))
        records, stats, skipped = run_into(executor, batches, store, "critique-revise", "row", progress)
    finally:
        executor.close()
    return _summarize(config, records, stats, skipped, time.perf_counter() - start)


def _summarize(config: CritiqueConfig, records: list[SFTRecord], stats: RunStats, skipped: int, wall: float
               ) -> RunSummary:
    flag_counts = Counter(k for r in records for k in r.flags.kinds())
    principle_counts = Counter(s.principle_id for r in records for s in r.steps)
    summary = RunSummary(
        out=str(config.out), rows_total=len(records), rows_written=stats.written, rows_skipped=skipped,
        rows_failed=stats.errors, flags=dict(flag_counts), principles=dict(principle_counts),
        generated_tokens=stats.tokens, wall_seconds=round(wall, 2),
        tokens_per_second=round(stats.tokens / wall, 2) if wall > 0 else 0.0, workers=stats.workers,
    )
    Path(f"{config.out}.summary.json").write_text(summary.model_dump_json(indent=2))
    return summary
