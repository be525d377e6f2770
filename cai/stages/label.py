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
from collections.abc import Callable
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
from cai.executors import Batch, ExecutorSettings, open_executor, run_into
from cai.executors.base import EngineInfo, WorkerStats, plan_batches
from cai.hashing import record_id, sha256_of
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
from cai.store import JsonlStore, check_output, read_records

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


class LabelConfig(LabelerSettings, ExecutorSettings):
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
    error: str | None = Field(None, description="the engine refused this pair even on its own; no label")
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
        self.tokens = 0  # reasoning tokens generated (chain-of-thought mode)

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
            self.tokens += sum(g.completion_tokens for g in gens)
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


    def failed_record(self, rid: str, pair: Pair, source: str, error: str) -> LabelRecord:
        """A pair the engine refuses even on its own: written once, with label_prob 0.5 and the error."""
        a = [Message(role="assistant", content=pair.response_a)]
        b = [Message(role="assistant", content=pair.response_b)]
        return LabelRecord(
            id=rid, source=source, source_index=pair.source_index, source_id=pair.source_id,  # type: ignore[arg-type]
            prompt=pair.prompt, response_a=pair.response_a, response_b=pair.response_b, label_prob=0.5,
            chosen=a, rejected=b, principles=[], position_consistent=False, mode=self.settings.mode, error=error,
            provenance=Provenance(
                constitution_name=self.constitution.name, constitution_sha256=self.constitution.sha256,
                principle_ids=[], model=self.engine.model_id, engine=self.engine.name, seed=self.settings.seed,
                sampling=self.settings.labeler_params(), cai_version=__version__,
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


def judge_records(labeler: Labeler, todo: list[tuple[str, Pair, dict[str, Any]]], source: str) -> list[LabelRecord]:
    """(id, pair, record extras) items -> their rows, in one judge call."""
    judged = labeler.judge([pair for _, pair, _ in todo])
    return [labeler.record(rid, pair, labels, source, **extra) for (rid, pair, extra), labels in zip(todo, judged)]


def label_into(
    labeler: Labeler, store: JsonlStore, todo: list[tuple[str, Pair, dict[str, Any]]], source: str,
    batch_size: int, bar: tqdm | None = None,
) -> int:
    """Label (id, pair, record extras) in batches fixed by position in `todo` (every row of the run,
    written or not), appending each new row as soon as its batch is done. A batch with any row missing
    from `store` is labelled whole, so a resumed run computes each row with the same batch-mates as an
    uninterrupted one; rows already written are not written again."""
    written = 0
    for b in range(0, len(todo), batch_size):
        batch = todo[b : b + batch_size]
        missing = [rid for rid, _, _ in batch if rid not in store]
        if not missing:
            continue
        for record in judge_records(labeler, batch, source):
            if record.id not in store:
                store.append(record)
                written += 1
        if bar is not None:
            bar.update(len(missing))
    return written


class LabelSummary(BaseModel):
    """What a `cai label` run did and the quality signals of its labels (saved as <out>.metrics.json)."""

    model_config = ConfigDict(extra="forbid")

    out: str
    rows_total: int
    rows_written: int
    rows_skipped: int
    rows_failed: int = 0  # written this run with an error flag
    identical_skipped: int  # pairs whose two responses are the same text carry no preference
    wall_seconds: float
    seconds_per_pair: float | None  # wall time / rows written this run
    metrics: LabelMetrics
    flags: dict[str, int] = Field(default_factory=dict, description="rows per RowFlag (prompts cut or not run)")
    workers: list[WorkerStats] = Field(default_factory=list)

    def render(self) -> str:
        m = self.metrics
        agree = "n/a" if m.principle_agreement is None else f"{m.principle_agreement:.3f}"
        per_pair = "n/a" if self.seconds_per_pair is None else f"{self.seconds_per_pair:.2f}s"
        return (
            f"wrote {self.rows_written} rows to {self.out} ({self.rows_skipped} already there, "
            f"{self.rows_total} in total; {self.identical_skipped} pairs with identical responses skipped; "
            f"{self.rows_failed} with an error flag)\n"
            f"position-bias rate {m.position_bias_rate:.3f} over {m.judgements} judgements; "
            f"consistent pairs {m.position_consistent_pairs:.3f}\n"
            f"mean confidence |2p-1| {m.mean_confidence:.3f}; mean entropy {m.mean_entropy_bits:.3f} bits; "
            f"principle agreement {agree}; mean label_prob {m.label_prob_mean:.3f}\n"
            f"wall {self.wall_seconds:.1f}s ({per_pair} per pair)"
            + (f"\nflags: {', '.join(f'{k}={v}' for k, v in sorted(self.flags.items()))}" if self.flags else "")
            + "".join(f"\n  {w.render()}" for w in self.workers)
        )


def _norm(text: str) -> str:
    return " ".join(text.split())


def policy_ids(conversation: list[Message], samples: int, config_hash: str) -> list[str]:
    """Ids of the sample pairs of one prompt: known before sampling, so a resumed run samples only
    the prompts it has not finished."""
    return [record_id(as_dicts(conversation), s, t, config_hash) for s, t in sample_index_pairs(samples)]


class LabelRunner:
    """`cai label` bound to its engines on one worker: one fixed batch of inputs -> its rows."""

    def __init__(self, config: LabelConfig, labeler: Labeler, policy: Engine | None, config_hash: str):
        self.config, self.labeler, self.policy, self.config_hash = config, labeler, policy, config_hash
        if policy is not None:
            self.sampling = SamplingConfig(
                temperature=config.policy_temperature, top_p=config.policy_top_p,
                max_new_tokens=config.policy_max_new_tokens, stop=tuple(policy.stop_sequences), seed=config.seed,
            )

    @property
    def tokens(self) -> int:
        return self.labeler.tokens

    def engine_info(self) -> EngineInfo:
        engine = self.labeler.engine
        return EngineInfo(name=engine.name, model_id=engine.model_id, fingerprint=engine_fingerprint(engine))

    def run(self, items: list[tuple[int, Any]]) -> list[LabelRecord]:
        """Items are (input position, pair), or (input position, conversation) for policy samples."""
        if self.config.source == "policy":
            return self._run_policy(items)
        return self._label([(record_id(pair.key(), self.config_hash), pair, {}) for _, pair in items])

    def _label(self, todo: list[tuple[str, Pair, dict[str, Any]]]) -> list[LabelRecord]:
        size = self.config.batch_size
        return [r for b in range(0, len(todo), size) for r in judge_records(self.labeler, todo[b:b + size],
                                                                             self.config.source)]

    def _run_policy(self, items: list[tuple[int, list[Message]]]) -> list[LabelRecord]:
        """Sample `samples` responses per prompt, then label every two of them (identical ones carry
        no preference and get no row)."""
        c = self.config
        assert self.policy is not None
        seeds = [row_seed(c.seed, "policy", as_dicts(conv)) for _, conv in items]
        samples = sample_responses(self.policy, [conv for _, conv in items], c.samples, self.sampling, seeds)
        todo = []
        for (i, conv), texts in zip(items, samples):
            for rid, (s, t) in zip(policy_ids(conv, c.samples, self.config_hash), sample_index_pairs(c.samples)):
                if _norm(texts[s]) != _norm(texts[t]):
                    pair = Pair(prompt=conv, response_a=texts[s], response_b=texts[t], source_index=i + 1)
                    extra = {"policy": c.policy_sampling(), "policy_samples": [s, t]}
                    todo.append((rid, pair, {"sampling_extra": extra}))
        return self._label(todo)

    def failed(self, item: tuple[int, Any], error: str) -> list[LabelRecord]:
        i, what = item
        if self.config.source != "policy":
            return [self.labeler.failed_record(record_id(what.key(), self.config_hash), what, self.config.source, error)]
        pair = Pair(prompt=what, response_a="", response_b="", source_index=i + 1)
        return [self.labeler.failed_record(rid, pair, "policy", error)
                for rid in policy_ids(what, self.config.samples, self.config_hash)]


class LabelWorker:
    """`cai label` as each worker opens it: picklable (engines already loaded here stay local)."""

    def __init__(self, config: LabelConfig, engine: Engine | None = None, policy_engine: Engine | None = None,
                 engine_factory: Callable[[], Engine] | None = None):
        self.config, self.engine, self.policy_engine = config, engine, policy_engine
        self.engine_factory = engine_factory

    def open(self) -> LabelRunner:
        from cai.engines import load_engine

        c = self.config
        # a policy model of its own means two engines alive at once: on vLLM each takes its share of the
        # GPU at start, so they split the configured share (else the second one cannot start)
        both = c.source == "policy" and c.policy_model is not None and self.engine is None and self.policy_engine is None
        options = split_gpu_share(c.engine, c.engine_options, 2 if both else 1)
        engine = self.engine or (self.engine_factory() if self.engine_factory else None)
        labeler = load_labeler(c.model_copy(update={"engine_options": options}), engine)
        policy = None
        if c.source == "policy":
            policy = self.policy_engine or labeler.engine
            if self.policy_engine is None and c.policy_model is not None:
                policy = load_engine(c.engine, c.policy_model, **options)
        fingerprint = {**c.fingerprint(labeler.constitution, labeler.templates, labeler.engine.model_id),
                       **engine_fingerprint(labeler.engine)}
        return LabelRunner(c, labeler, policy, sha256_of(fingerprint)[:16])


def _load_items(config: LabelConfig) -> list[Any]:
    """The input: conversations (policy source) or pairs."""
    from cai.stages.inputs import load_prompts

    if config.source == "policy":
        assert config.prompts is not None
        return load_prompts(config.prompts, limit=config.limit)  # type: ignore[return-value]
    path = config.pairs if config.source == "pairs" else config.critique
    assert path is not None
    return (read_label_pairs if config.source == "pairs" else read_critique_pairs)(path, limit=config.limit)


def _batches(config: LabelConfig, items: list[Any], config_hash: str) -> tuple[list[Batch], int]:
    """This shard's fixed batches (by input position) and how many input pairs were identical."""
    from cai.stages.inputs import parse_shard

    batches, identical = [], 0
    for k, idx in enumerate(plan_batches(len(items), config.batch_size, parse_shard(config.shard))):
        if config.source == "policy":
            ids = [rid for i in idx for rid in policy_ids(items[i], config.samples, config_hash)]
            batches.append(Batch(k, ids, [(i, items[i]) for i in idx]))
            continue
        keep = [i for i in idx if _norm(items[i].response_a) != _norm(items[i].response_b)]
        identical += len(idx) - len(keep)
        if keep:
            batches.append(Batch(k, [record_id(items[i].key(), config_hash) for i in keep], [(i, items[i]) for i in keep]))
    return batches, identical


def run_label(config: LabelConfig, engine: Engine | None = None, policy_engine: Engine | None = None,
              progress: bool = True, engine_factory: Callable[[], Engine] | None = None) -> LabelSummary:
    """load -> (sample) -> label -> write, resuming from `config.out`; metrics to <out>.metrics.json.

    `engine` / `policy_engine`: engines already loaded in this process (local executor only);
    `engine_factory`: how each worker builds the labeler engine instead (must pickle for Ray)."""
    from cai.stages.critique import select_principles

    constitution = load_constitution(config.constitution)
    templates = load_feedback_templates(config.feedback_templates)
    select_principles(constitution, config.tags)
    items = _load_items(config)  # before loading a model, so a bad file fails in a second, not after a minute
    check_output(config.out)  # likewise: another process writing the output stops this one now
    executor = open_executor(config.executor_settings(), LabelWorker(config, engine, policy_engine, engine_factory))
    start = time.perf_counter()
    try:
        info = executor.engine_info()
        fingerprint = {**config.fingerprint(constitution, templates, info.model_id), **info.fingerprint}
        batches, identical = _batches(config, items, sha256_of(fingerprint)[:16])
        store = JsonlStore(config.out, LabelRecord, stage="label", config=fingerprint, force=config.force)
        records, stats, skipped = run_into(executor, batches, store, "label", "pair", progress)
    finally:
        executor.close()
    if config.source == "policy":  # the pairs of two identical samples are the ids never written
        identical = len({rid for b in batches for rid in b.ids}) - len(records)
    wall = time.perf_counter() - start
    summary = LabelSummary(
        out=str(config.out), rows_total=len(records), rows_written=stats.written, rows_skipped=skipped,
        rows_failed=stats.errors, identical_skipped=identical, wall_seconds=round(wall, 3),
        seconds_per_pair=round(wall / stats.written, 3) if stats.written else None,
        metrics=metrics_of([r for r in records if r.error is None]), workers=stats.workers,
        flags=dict(Counter(f for r in records for f in r.flags)),
    )
    Path(f"{config.out}.metrics.json").write_text(summary.model_dump_json(indent=2))
    return summary


def label_tables(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Export of a label output: `preferences` (the trainer form, label_prob = P(chosen better),
    source ai-<constitution name>; rows with an error flag carry no label and are left out) and `labels`
    (every field of every row)."""
    records = read_records(Path(path), LabelRecord)
    return {
        "preferences": [
            r.preference(f"ai-{r.provenance.constitution_name}").model_dump(mode="json")
            for r in records if r.error is None
        ],
        "labels": [r.model_dump(mode="json") for r in records],
    }
