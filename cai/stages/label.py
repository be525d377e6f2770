"""AI feedback: label preference pairs with a model and a constitution (RLAIF).

For each pair and each principle the model reads a multiple-choice question ("(A) ... (B) ...")
and the log-probs of the answer letters give a soft label. Each question is asked in both orders,
because small labelers pick a slot as much as a response:

    p_ab = P(first | A first)           probability A is better, A shown first
    p_ba = 1 - P(first | B first)       probability A is better, B shown first
    p    = (p_ab + p_ba) / 2            the principle's label (swapping A and B gives exactly 1 - p)
    label_prob = mean of p over the principles judged (all, or k drawn per pair with a seed)

In chain-of-thought mode the model first writes its reasoning (engine.generate), the answer
letters are then scored after an answer cue, and p_ab and p_ba are clamped to a band (default
[0.4, 0.6]) because reasoned answers are over-confident.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from cai import __version__
from cai.constitution import Constitution, Principle, load_constitution
from cai.conversation import Message, as_dicts
from cai.engines import split_gpu_share
from cai.engines.base import Engine, SamplingConfig, engine_details, engine_fingerprint, row_flag
from cai.errors import CaiError
from cai.hashing import record_id, sha256_of
from cai.locking import check_free
from cai.prompts import (
    FeedbackTemplates,
    answer_cue_after_reasoning,
    feedback_messages,
    load_feedback_templates,
)
from cai.records import Provenance
from cai.stages.critique import sample_principles
from cai.stages.label_metrics import LabelMetrics, label_metrics, verdict
from cai.stages.pairs import (
    Pair,
    PreferenceRow,
    read_critique_pairs,
    read_label_pairs,
    row_seed,
    sample_index_pairs,
    sample_responses,
)
from cai.store import JsonlStore, read_records

Mode = Literal["direct", "cot"]


# ---------------------------------------------------------------- the label math


def first_choice_prob(logprobs: list[float]) -> float:
    """Softmax over the two options' log-probs -> probability of the first option."""
    a, b = logprobs
    m = max(a, b)
    if m == -math.inf:
        return 0.5
    ea, eb = math.exp(a - m), math.exp(b - m)
    return ea / (ea + eb)


def combine_orders(first_ab: float, first_ba: float) -> tuple[float, float, float]:
    """(P(first) with A first, P(first) with B first) -> (p_ab, p_ba, p), all as P(A better)."""
    p_ab, p_ba = first_ab, 1.0 - first_ba
    return p_ab, p_ba, (p_ab + p_ba) / 2


def clamp(p: float, band: tuple[float, float]) -> float:
    return min(max(p, band[0]), band[1])


def ensemble(probs: list[float]) -> float:
    """The label of a pair: the plain mean of its principles' probabilities."""
    return sum(probs) / len(probs)


# ---------------------------------------------------------------- configs and rows


class LabelerSettings(BaseModel):
    """How the labeler judges a pair (shared by `cai label` and `cai label eval`)."""

    model_config = ConfigDict(extra="forbid")

    constitution: Path
    model: str | None = Field(None, description="labeler: local path or hub id; None = the bundled Gemma 3 270M")
    engine: Literal["hf", "vllm"] = "hf"
    engine_options: dict[str, Any] = Field(default_factory=dict, description="passed to the engine constructor")
    feedback_templates: Path | None = Field(None, description="feedback prompt YAML; None = prompts/feedback.yaml")
    principles: int | None = Field(None, ge=1, description="principles per pair, drawn with a seed; None = all")
    tags: list[str] | None = Field(None, description="only principles with one of these tags")
    cot: bool = Field(False, description="chain of thought: reason first, then score the answer")
    cot_max_new_tokens: int = Field(128, ge=1)
    cot_temperature: float = Field(0.0, ge=0.0, description="0 = greedy reasoning")
    clamp: tuple[float, float] = Field((0.4, 0.6), description="band for chain-of-thought probabilities")
    batch_size: int = Field(8, ge=1, description="pairs per engine call (x principles x 2 orders prompts)")
    seed: int = 0
    limit: int | None = Field(None, ge=1)
    force: bool = Field(False, description="move an output written with another config aside and start over")

    @model_validator(mode="after")
    def _band(self) -> LabelerSettings:
        lo, hi = self.clamp
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"clamp must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(self.clamp)}")
        return self

    @property
    def mode(self) -> Mode:
        return "cot" if self.cot else "direct"

    def labeler_params(self) -> dict[str, Any]:
        """What provenance records about the labeler's settings."""
        params: dict[str, Any] = {"mode": self.mode, "principles_per_pair": self.principles, "tags": self.tags}
        if self.cot:
            params.update(clamp=list(self.clamp), cot_temperature=self.cot_temperature,
                          cot_max_new_tokens=self.cot_max_new_tokens)
        return params

    def fingerprint(self, constitution: Constitution, templates: FeedbackTemplates, model_id: str) -> dict[str, Any]:
        return {
            "constitution_sha256": constitution.sha256,
            "feedback_templates_sha256": sha256_of(templates.model_dump(mode="json")),
            "model": model_id,
            "engine": self.engine,
            "labeler": self.labeler_params(),
            "seed": self.seed,
        }


class LabelConfig(LabelerSettings):
    """Settings of `cai label`: exactly one of pairs / critique / prompts is the input."""

    pairs: Path | None = Field(None, description="JSONL of prompt/response_a/response_b (or prompt/chosen/rejected)")
    critique: Path | None = Field(None, description="`cai generate` output: initial vs final response")
    prompts: Path | None = Field(None, description="prompts to sample a policy on; pairs of its samples are labelled")
    out: Path
    shard: str | None = Field(None, description="i/n: every n-th input starting at i")
    samples: int = Field(2, ge=2, description="policy samples per prompt; every two of them form a pair")
    policy_model: str | None = Field(None, description="model that samples the responses; None = the labeler")
    policy_temperature: float = Field(1.0, ge=0.0)
    policy_top_p: float = Field(1.0, gt=0.0, le=1.0)
    policy_max_new_tokens: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> LabelConfig:
        given = [k for k in ("pairs", "critique", "prompts") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of pairs, critique, prompts (got {', '.join(given) or 'none'})")
        return self

    @property
    def source(self) -> Literal["pairs", "critique", "policy"]:
        return "pairs" if self.pairs else "critique" if self.critique else "policy"

    def policy_sampling(self) -> dict[str, Any]:
        return {"model": self.policy_model, "samples": self.samples, "temperature": self.policy_temperature,
                "top_p": self.policy_top_p, "max_new_tokens": self.policy_max_new_tokens}

    def fingerprint(self, constitution: Constitution, templates: FeedbackTemplates, model_id: str) -> dict[str, Any]:
        out = super().fingerprint(constitution, templates, model_id)
        out["source"] = self.source
        if self.source == "policy":
            out["policy"] = self.policy_sampling()
        return out


class PrincipleLabel(BaseModel):
    """One principle's judgement of a pair, in both orders (all probabilities are P(A better))."""

    model_config = ConfigDict(extra="forbid")

    principle_id: str
    p_ab: float
    p_ba: float
    p: float
    reasoning_ab: str | None = None
    reasoning_ba: str | None = None
    prompt_flags: list[str] = Field(default_factory=list, description="RowFlags of its prompts (cut or not run)")

    @property
    def position_consistent(self) -> bool:
        return verdict(self.p_ab) == verdict(self.p_ba)


class LabelRecord(BaseModel):
    """A labelled pair. chosen/rejected follow label_prob (A is chosen when label_prob >= 0.5)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    source: Literal["pairs", "critique", "policy", "human"]
    source_index: int
    source_id: str | None = None
    prompt: list[Message]
    response_a: str
    response_b: str
    label_prob: float = Field(description="probability that response A is better")
    chosen: list[Message]
    rejected: list[Message]
    principles: list[PrincipleLabel]
    position_consistent: bool = Field(description="the ensembled verdict is the same in both orders")
    mode: Mode
    human_choice: Literal["A", "B"] | None = Field(None, description="label eval only: the human's pick")
    flags: list[str] = Field(default_factory=list, description="RowFlags of any of its prompts")
    provenance: Provenance

    def preference(self, source: str) -> PreferenceRow:
        """The trainer row: chosen/rejected with the probability that chosen is better."""
        return PreferenceRow(id=self.id, prompt=self.prompt, chosen=self.chosen, rejected=self.rejected,
                             label_prob=max(self.label_prob, 1.0 - self.label_prob), source=source)


# ---------------------------------------------------------------- the labeler


class Labeler:
    """Turns batches of pairs into per-principle judgements with one engine."""

    def __init__(self, settings: LabelerSettings, engine: Engine, constitution: Constitution,
                 templates: FeedbackTemplates):
        self.settings = settings
        self.engine = engine
        self.constitution = constitution
        self.templates = templates
        self.principles = constitution.select(settings.tags)
        if not self.principles:
            raise CaiError(f"no principle of {constitution.source_path} has any of the tags {settings.tags}")
        self.choices = list(templates.choices)
        if len(self.choices) != 2:
            raise CaiError(f"feedback templates must define two answer choices, got {self.choices}")
        self.cot_sampling = SamplingConfig(
            temperature=settings.cot_temperature, max_new_tokens=settings.cot_max_new_tokens,
            stop=tuple(engine.stop_sequences), seed=settings.seed,
        )
        self.calls = 0  # engine calls, for tests and progress

    def principles_for(self, pair: Pair) -> list[Principle]:
        """All selected principles, or k of them drawn by weight with a seed from the pair's content."""
        k = self.settings.principles
        if k is None or k >= len(self.principles):
            return list(self.principles)
        rng = random.Random(row_seed(self.settings.seed, "principles", pair.key()))
        return sample_principles(self.principles, k, rng, with_replacement=False)

    def _prompt(self, pair: Pair, principle: Principle, swapped: bool) -> str:
        a, b = (pair.response_b, pair.response_a) if swapped else (pair.response_a, pair.response_b)
        messages, prefix = feedback_messages(
            self.templates, as_dicts(pair.prompt), a, b, principle, cot=self.settings.cot
        )
        return self.engine.render_chat(messages, prefix)

    def judge(self, pairs: list[Pair]) -> list[list[PrincipleLabel]]:
        """Every pair x principle x order of a batch in one choice_logprobs call (plus one generate
        call for the reasoning in CoT mode)."""
        jobs = [(i, p) for i, pair in enumerate(pairs) for p in self.principles_for(pair)]
        prompts = [self._prompt(pairs[i], p, swapped) for i, p in jobs for swapped in (False, True)]
        reasoning: list[str | None] = [None] * len(prompts)
        flags: list[set[str]] = [set() for _ in prompts]
        if self.settings.cot:
            seeds = [row_seed(self.settings.seed, "cot", pairs[i].key(), p.id, swapped)
                     for i, p in jobs for swapped in (False, True)]
            gens = self.engine.generate(prompts, self.cot_sampling, seeds=seeds)
            self.calls += 1
            reasoning = [g.text.strip() for g in gens]
            flags = [{g.flag} if g.flag else set() for g in gens]
            prompts = [prompt + g.text + self._cue() for prompt, g in zip(prompts, gens)]
        logprobs = self.engine.choice_logprobs(prompts, [self.choices] * len(prompts))
        self.calls += 1
        for f, scores in zip(flags, logprobs):
            f.update(filter(None, [row_flag(scores)]))
        out: list[list[PrincipleLabel]] = [[] for _ in pairs]
        for j, (i, principle) in enumerate(jobs):
            first_ab, first_ba = first_choice_prob(logprobs[2 * j]), first_choice_prob(logprobs[2 * j + 1])
            if self.settings.cot:
                first_ab, first_ba = clamp(first_ab, self.settings.clamp), clamp(first_ba, self.settings.clamp)
            p_ab, p_ba, p = combine_orders(first_ab, first_ba)
            out[i].append(PrincipleLabel(principle_id=principle.id, p_ab=p_ab, p_ba=p_ba, p=p,
                                         reasoning_ab=reasoning[2 * j], reasoning_ba=reasoning[2 * j + 1],
                                         prompt_flags=sorted(flags[2 * j] | flags[2 * j + 1])))
        return out

    def _cue(self) -> str:
        return answer_cue_after_reasoning(self.templates)

    def record(self, rid: str, pair: Pair, labels: list[PrincipleLabel], source: str,
               sampling_extra: dict[str, Any] | None = None, human_choice: Literal["A", "B"] | None = None
               ) -> LabelRecord:
        p = ensemble([x.p for x in labels])
        a = [Message(role="assistant", content=pair.response_a)]
        b = [Message(role="assistant", content=pair.response_b)]
        mean_ab = ensemble([x.p_ab for x in labels])
        mean_ba = ensemble([x.p_ba for x in labels])
        return LabelRecord(
            id=rid, source=source, source_index=pair.source_index, source_id=pair.source_id,  # type: ignore[arg-type]
            prompt=pair.prompt, response_a=pair.response_a, response_b=pair.response_b, label_prob=p,
            chosen=a if p >= 0.5 else b, rejected=b if p >= 0.5 else a, principles=labels,
            position_consistent=verdict(mean_ab) == verdict(mean_ba), mode=self.settings.mode,
            human_choice=human_choice, flags=sorted({f for x in labels for f in x.prompt_flags}),
            provenance=Provenance(
                constitution_name=self.constitution.name, constitution_sha256=self.constitution.sha256,
                principle_ids=[x.principle_id for x in labels], model=self.engine.model_id,
                engine=self.engine.name, engine_details=engine_details(self.engine), seed=self.settings.seed,
                sampling={**self.settings.labeler_params(), **(sampling_extra or {})}, cai_version=__version__,
            ),
        )


def metrics_of(records: list[LabelRecord]) -> LabelMetrics:
    return label_metrics(
        [r.label_prob for r in records],
        [[(x.p_ab, x.p_ba) for x in r.principles] for r in records],
        [r.position_consistent for r in records],
    )


# ---------------------------------------------------------------- running a stage


def load_labeler(settings: LabelerSettings, engine: Engine | None) -> Labeler:
    constitution = load_constitution(settings.constitution)
    templates = load_feedback_templates(settings.feedback_templates)
    if engine is None:
        from cai.engines import load_engine

        engine = load_engine(settings.engine, settings.model, **settings.engine_options)
    return Labeler(settings, engine, constitution, templates)


def label_into(
    labeler: Labeler, store: JsonlStore, todo: list[tuple[str, Pair, dict[str, Any]]], source: str,
    batch_size: int, bar: tqdm | None = None,
) -> int:
    """Label (id, pair, record extras) in batches and append each row as soon as its batch is done."""
    written = 0
    for b in range(0, len(todo), batch_size):
        batch = todo[b : b + batch_size]
        for (rid, pair, extra), labels in zip(batch, labeler.judge([pair for _, pair, _ in batch])):
            store.append(labeler.record(rid, pair, labels, source, **extra))
            written += 1
        if bar is not None:
            bar.update(len(batch))
    return written


class LabelSummary(BaseModel):
    """What a `cai label` run did and the quality signals of its labels (saved as <out>.metrics.json)."""

    model_config = ConfigDict(extra="forbid")

    out: str
    rows_total: int
    rows_written: int
    rows_skipped: int
    identical_skipped: int  # pairs whose two responses are the same text carry no preference
    wall_seconds: float
    seconds_per_pair: float | None  # wall time / rows written this run
    metrics: LabelMetrics
    flags: dict[str, int] = Field(default_factory=dict, description="rows per RowFlag (prompts cut or not run)")

    def render(self) -> str:
        m = self.metrics
        agree = "n/a" if m.principle_agreement is None else f"{m.principle_agreement:.3f}"
        per_pair = "n/a" if self.seconds_per_pair is None else f"{self.seconds_per_pair:.2f}s"
        return (
            f"wrote {self.rows_written} rows to {self.out} ({self.rows_skipped} already there, "
            f"{self.rows_total} in total; {self.identical_skipped} pairs with identical responses skipped)\n"
            f"position-bias rate {m.position_bias_rate:.3f} over {m.judgements} judgements; "
            f"consistent pairs {m.position_consistent_pairs:.3f}\n"
            f"mean confidence |2p-1| {m.mean_confidence:.3f}; mean entropy {m.mean_entropy_bits:.3f} bits; "
            f"principle agreement {agree}; mean label_prob {m.label_prob_mean:.3f}\n"
            f"wall {self.wall_seconds:.1f}s ({per_pair} per pair)"
            + (f"\nflags: {', '.join(f'{k}={v}' for k, v in sorted(self.flags.items()))}" if self.flags else "")
        )


def _norm(text: str) -> str:
    return " ".join(text.split())


def _policy_rows(config: LabelConfig, conversations: list[list[Message]], config_hash: str
                 ) -> list[tuple[int, list[Message], list[str]]]:
    """(input index, conversation, ids of its sample pairs) of this shard: ids are known before sampling,
    so a resumed run samples only the prompts it has not finished."""
    from cai.stages.inputs import parse_shard, shard_indices

    index_pairs = sample_index_pairs(config.samples)
    return [
        (i, conversations[i], [record_id(as_dicts(conversations[i]), s, t, config_hash) for s, t in index_pairs])
        for i in shard_indices(len(conversations), parse_shard(config.shard))
    ]


def _label_policy(config: LabelConfig, labeler: Labeler, policy: Engine, store: JsonlStore,
                  rows: list[tuple[int, list[Message], list[str]]], progress: bool) -> tuple[int, int]:
    """Sample `config.samples` responses per prompt, label every two of them; returns (written, identical)."""
    index_pairs = sample_index_pairs(config.samples)
    sampling = SamplingConfig(
        temperature=config.policy_temperature, top_p=config.policy_top_p,
        max_new_tokens=config.policy_max_new_tokens, stop=tuple(policy.stop_sequences), seed=config.seed,
    )
    todo_rows = [r for r in rows if not all(rid in store for rid in r[2])]
    written = identical = 0
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo_rows), desc="sample + label", unit="prompt",
               disable=not progress)
    for b in range(0, len(todo_rows), config.batch_size):
        batch = todo_rows[b : b + config.batch_size]
        seeds = [row_seed(config.seed, "policy", as_dicts(conv)) for _, conv, _ in batch]
        samples = sample_responses(policy, [conv for _, conv, _ in batch], config.samples, sampling, seeds)
        todo = []
        for (i, conv, ids), texts in zip(batch, samples):
            for rid, (s, t) in zip(ids, index_pairs):
                if rid in store:
                    continue
                if _norm(texts[s]) == _norm(texts[t]):
                    identical += 1
                    continue
                pair = Pair(prompt=conv, response_a=texts[s], response_b=texts[t], source_index=i + 1)
                extra = {"policy": config.policy_sampling(), "policy_samples": [s, t]}
                todo.append((rid, pair, {"sampling_extra": extra}))
        written += label_into(labeler, store, todo, "policy", config.batch_size)
        bar.update(len(batch))
    bar.close()
    return written, identical


def run_label(config: LabelConfig, engine: Engine | None = None, policy_engine: Engine | None = None,
              progress: bool = True) -> LabelSummary:
    """load -> (sample) -> label -> write, resuming from `config.out`; metrics to <out>.metrics.json."""
    from cai.stages.inputs import load_prompts, parse_shard, shard_indices

    # Read the input before loading a model, so a bad file fails in a second, not after a minute.
    if config.source == "policy":
        assert config.prompts is not None
        conversations = load_prompts(config.prompts, limit=config.limit)
    else:
        path = config.pairs if config.source == "pairs" else config.critique
        assert path is not None
        pairs = (read_label_pairs if config.source == "pairs" else read_critique_pairs)(path, limit=config.limit)
    check_free(config.out)  # fail in a second, not after loading a model
    # a policy model of its own means two engines alive at once: on vLLM each takes its share of the
    # GPU at start, so they split the configured share (else the second one cannot start)
    both = config.source == "policy" and config.policy_model is not None and engine is None and policy_engine is None
    options = split_gpu_share(config.engine, config.engine_options, 2 if both else 1)
    labeler = load_labeler(config.model_copy(update={"engine_options": options}), engine)
    fingerprint = {**config.fingerprint(labeler.constitution, labeler.templates, labeler.engine.model_id),
                   **engine_fingerprint(labeler.engine)}
    config_hash = sha256_of(fingerprint)[:16]
    if config.source == "policy":
        rows = _policy_rows(config, conversations, config_hash)
        run_ids = {rid for _, _, ids in rows for rid in ids}
    else:
        keep = [pairs[i] for i in shard_indices(len(pairs), parse_shard(config.shard))]
        todo = [(record_id(p.key(), config_hash), p, {}) for p in keep if _norm(p.response_a) != _norm(p.response_b)]
        identical = len(keep) - len(todo)
        run_ids = {rid for rid, _, _ in todo}
    store = JsonlStore(config.out, LabelRecord, stage="label", config=fingerprint, force=config.force)
    skipped = len(run_ids & store.ids)
    start = time.perf_counter()
    with store:
        if config.source == "policy":
            if policy_engine is None and config.policy_model is not None:
                from cai.engines import load_engine

                policy_engine = load_engine(config.engine, config.policy_model, **options)
            written, identical = _label_policy(
                config, labeler, policy_engine or labeler.engine, store, rows, progress
            )
        else:
            todo = [t for t in todo if t[0] not in store]
            bar = tqdm(total=len(run_ids), initial=skipped, desc="label", unit="pair", disable=not progress)
            written = label_into(labeler, store, todo, config.source, config.batch_size, bar)
            bar.close()
        records = [r for r in store.records() if r.id in run_ids]
    wall = time.perf_counter() - start
    summary = LabelSummary(
        out=str(config.out), rows_total=len(records), rows_written=written, rows_skipped=skipped,
        identical_skipped=identical, wall_seconds=round(wall, 3),
        seconds_per_pair=round(wall / written, 3) if written else None, metrics=metrics_of(records),
        flags=dict(Counter(f for r in records for f in r.flags)),
    )
    Path(f"{config.out}.metrics.json").write_text(summary.model_dump_json(indent=2))
    return summary


def label_tables(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Export of a label output: `preferences` (the trainer form, label_prob = P(chosen better),
    source ai-<constitution name>) and `labels` (every field of every row)."""
    records = read_records(Path(path), LabelRecord)
    return {
        "preferences": [
            r.preference(f"ai-{r.provenance.constitution_name}").model_dump(mode="json") for r in records
        ],
        "labels": [r.model_dump(mode="json") for r in records],
    }
