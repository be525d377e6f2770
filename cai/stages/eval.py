"""`cai eval`: what the training bought. N policies, two axes, over-refusal.

1. Every policy answers held-out red-team prompts, held-out helpful prompts, and the benign and
   harmful prompts of the over-refusal check (eval_answers: per-prompt seeds shared by the policies).
2. The AI judge (the labeler of `cai label`) compares every two policies' answers to each prompt,
   both orders, soft labels: red-team prompts under the harmless constitution, helpful prompts
   under helpful-honest (eval_judge).
3. Bradley-Terry / Elo per axis with prompt-bootstrap 95% intervals (eval_elo).
4. Each benign/harmful reply gets the judge's refusal question and the phrase rule (eval_refusal).

Writes OUT/answers.jsonl, OUT/judged.jsonl, OUT/refusals.jsonl (all resumable, with provenance),
OUT/elo.json (EloSummary), OUT/refusals.json (RefusalSummary), OUT/summary.json (the two plus
timings) and OUT/elo.png (harmlessness Elo against helpfulness Elo, one point per policy).

A small judge is a weak judge: with the bundled 270M model most labels sit near 0.5 and flip with
the order of the answers, so ratings are close together and their intervals wide and overlapping.
The intervals are there to say so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai.conversation import Message
from cai.engines.base import Engine, SamplingConfig
from cai.errors import CaiError
from cai.hashing import sha256_of
from cai.stages.eval_answers import AnswerRecord, EngineFor, PolicySpec, answer_all
from cai.stages.eval_elo import Judged, PolicyElo, rate_policies
from cai.stages.eval_judge import Axis, JudgedPair, RefusalRecord, judge_axis, judge_replies
from cai.stages.eval_refusal import (
    REFUSAL_PATTERNS,
    RefusalRates,
    RefusalTemplate,
    load_refusal_template,
    refusal_rates,
)
from cai.stages.label import Labeler, LabelerSettings
from cai.store import JsonlStore

ROOT = Path(__file__).resolve().parents[2]
EVAL_SETS = ROOT / "examples" / "eval"
CONSTITUTIONS = ROOT / "constitutions"


class PolicyEvalConfig(BaseModel):
    """Settings of `cai eval` (and of the pipeline's `eval` section)."""

    model_config = ConfigDict(extra="forbid")

    policies: list[PolicySpec] = Field(min_length=2, description="at least two: ratings are relative")
    red_team: Path = Field(EVAL_SETS / "red_team.jsonl", description="held-out red-team prompts (harmless axis)")
    red_team_skip: int = Field(0, ge=0, description="leave out the first N (e.g. those used for training)")
    red_team_limit: int | None = Field(None, ge=1)
    helpful: Path = Field(EVAL_SETS / "helpful.jsonl", description="held-out helpful prompts (helpful axis)")
    helpful_limit: int | None = Field(None, ge=1)
    benign: Path | None = Field(EVAL_SETS / "benign.jsonl", description="sensitive-looking benign prompts; None = skip")
    harmful: Path | None = Field(EVAL_SETS / "harmful.jsonl", description="harmful prompts; None = skip")
    refusal_limit: int | None = Field(None, ge=1, description="first N of each of benign and harmful")
    judge_model: str | None = Field(None, description="the judge; None = the bundled Gemma 3 270M")
    engine: Literal["hf", "vllm"] = "hf"
    engine_options: dict[str, Any] = Field(default_factory=dict)
    harmless_constitution: Path = CONSTITUTIONS / "harmless.yaml"
    helpful_constitution: Path = CONSTITUTIONS / "helpful-honest.yaml"
    feedback_templates: Path | None = None
    refusal_template: Path | None = Field(None, description="None = prompts/refusal.yaml")
    principles: int | None = Field(2, ge=1, description="principles drawn per judged pair; None = all")
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(8, ge=1)
    bootstrap: int = Field(200, ge=10, description="bootstrap refits for the 95% intervals")
    prior: float = Field(1.0, ge=0.0, description="virtual 0.5-judged pairs between every two policies")
    seed: int = 0
    out: Path
    force: bool = False

    @model_validator(mode="after")
    def _unique(self) -> PolicyEvalConfig:
        names = [p.name for p in self.policies]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"policy names must be unique; repeated: {', '.join(dup)}")
        return self

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                              seed=self.seed)

    def labeler_settings(self, axis: Axis) -> LabelerSettings:
        constitution = self.harmless_constitution if axis == "harmless" else self.helpful_constitution
        return LabelerSettings(constitution=constitution, model=self.judge_model, engine=self.engine,
                               engine_options=self.engine_options, feedback_templates=self.feedback_templates,
                               principles=self.principles, batch_size=self.batch_size, seed=self.seed)


class AxisElo(BaseModel):
    """One axis: which constitution judged, how much evidence, and each policy's rating."""

    model_config = ConfigDict(extra="forbid")

    axis: Axis
    constitution: str
    constitution_sha256: str
    prompts: int
    pairs: int
    identical_pairs: int
    position_consistent: float = Field(description="share of judged pairs with the same verdict in both orders")
    policies: list[PolicyElo]


class EloSummary(BaseModel):
    """OUT/elo.json."""

    model_config = ConfigDict(extra="forbid")

    judge: str
    bootstrap: int
    prior: float
    harmless: AxisElo
    helpful: AxisElo


class RefusalSummary(BaseModel):
    """OUT/refusals.json: per-policy rates, and the rule's patterns so a reader can check them."""

    model_config = ConfigDict(extra="forbid")

    judge: str
    template: str
    benign_prompts: int
    harmful_prompts: int
    policies: list[RefusalRates]
    patterns: list[str]


class PolicyEvalSummary(BaseModel):
    """OUT/summary.json: what the run did, how long it took, and both results."""

    model_config = ConfigDict(extra="forbid")

    out: str
    policies: list[PolicySpec]
    answers: int
    judged_pairs: int
    refusal_judgements: int
    wall_seconds: float
    seconds_per_judged_pair: float | None = Field(description="judging wall time / pairs judged this run")
    elo: EloSummary
    refusals: RefusalSummary | None

    def render(self) -> str:
        lines = [f"{'policy':<16}{'harmless Elo (95% CI)':>28}{'helpful Elo (95% CI)':>28}"]
        for h, g in zip(self.elo.harmless.policies, self.elo.helpful.policies):
            lines.append(f"{h.policy:<16}{h.elo:>10.0f} ({h.low:>6.0f}, {h.high:>6.0f}){'':>4}"
                         f"{g.elo:>10.0f} ({g.low:>6.0f}, {g.high:>6.0f})")
        if self.refusals:
            lines.append(f"\n{'policy':<16}{'benign refused (judge / rule)':>32}{'harmful answered (judge / rule)':>34}")
            for r in self.refusals.policies:
                lines.append(f"{r.policy:<16}{_pct(r.benign_refusal_judge.rate):>20} / {_pct(r.benign_refusal_rule.rate):<9}"
                             f"{_pct(r.harmful_compliance_judge.rate):>22} / {_pct(r.harmful_compliance_rule.rate)}")
        per = "n/a" if self.seconds_per_judged_pair is None else f"{self.seconds_per_judged_pair:.2f}s"
        lines.append(f"\n{self.answers} answers, {self.judged_pairs} judged pairs, {self.refusal_judgements} refusal "
                     f"judgements; wall {self.wall_seconds:.1f}s ({per} per judged pair)")
        return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _load_sets(config: PolicyEvalConfig) -> dict[str, list[list[Message]]]:
    from cai.stages.inputs import load_prompts

    red = config.red_team_skip + config.red_team_limit if config.red_team_limit else None
    sets = {"red_team": load_prompts(config.red_team, limit=red)[config.red_team_skip:]}
    if not sets["red_team"]:
        raise CaiError(f"{config.red_team}: no prompts left after skipping the first {config.red_team_skip}; "
                       "lower red_team_skip or give a longer file")
    sets["helpful"] = load_prompts(config.helpful, limit=config.helpful_limit)
    for name in ("benign", "harmful"):
        path = getattr(config, name)
        if path is not None:
            sets[name] = load_prompts(path, limit=config.refusal_limit)
    return sets


def default_engines(config: PolicyEvalConfig) -> EngineFor:
    """Load each model when asked, keeping only the last one in memory."""
    held: dict[str, Any] = {}

    def engine_for(model: str | None) -> Engine:
        from cai.engines import load_engine

        key = sha256_of([model])
        if key not in held:
            held.clear()
            held[key] = load_engine(config.engine, model, **config.engine_options)
        return held[key]

    return engine_for


def _axis_summary(axis: Axis, labeler: Labeler, policies: list[str], rows: list[JudgedPair],
                  config: PolicyEvalConfig) -> AxisElo:
    judged = [Judged(a=r.policy_a, b=r.policy_b, p=r.p, group=str(r.prompt_index)) for r in rows]
    labelled = [r.label for r in rows if r.label is not None]
    return AxisElo(
        axis=axis, constitution=labeler.constitution.name, constitution_sha256=labeler.constitution.sha256,
        prompts=len({r.prompt_index for r in rows}), pairs=len(rows), identical_pairs=len(rows) - len(labelled),
        position_consistent=sum(r.position_consistent for r in labelled) / len(labelled) if labelled else 1.0,
        policies=rate_policies(policies, judged, config.bootstrap, config.seed, config.prior),
    )


def run_policy_eval(config: PolicyEvalConfig, engine_for: EngineFor | None = None,
                    progress: bool = True) -> PolicyEvalSummary:
    """Answer, judge, rate; resumes from what OUT already holds."""
    from cai.constitution import load_constitution
    from cai.prompts import load_feedback_templates

    sets = _load_sets(config)  # bad inputs fail before any model loads
    templates = load_feedback_templates(config.feedback_templates)
    refusal_template = load_refusal_template(config.refusal_template)
    constitutions = {a: load_constitution(config.labeler_settings(a).constitution) for a in ("harmless", "helpful")}
    engine_for = engine_for or default_engines(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    sampling = config.sampling()
    names = [p.name for p in config.policies]
    start = time.perf_counter()
    with JsonlStore(out / "answers.jsonl", AnswerRecord, stage="eval-answers",
                    config={"sampling": sampling.model_dump(mode="json"), "engine": config.engine},
                    force=config.force) as store:
        # the policy that is also the judge answers last, so its loaded engine goes on to judge
        order = sorted(config.policies, key=lambda p: p.model == config.judge_model)
        answers = answer_all(order, sets, engine_for, store, sampling, config.batch_size, progress)
    judge = engine_for(config.judge_model)
    labelers = {a: Labeler(config.labeler_settings(a), judge, constitutions[a], templates)  # type: ignore[arg-type]
                for a in ("harmless", "helpful")}
    fingerprint = {a: config.labeler_settings(a).fingerprint(constitutions[a], templates, judge.model_id)  # type: ignore[arg-type]
                   for a in ("harmless", "helpful")}
    judge_start = time.perf_counter()
    with JsonlStore(out / "judged.jsonl", JudgedPair, stage="eval-judge", config=fingerprint,
                    force=config.force) as store:
        before = len(store)
        rows = {a: judge_axis(a, labelers[a], names, answers, store, config.batch_size, progress)  # type: ignore[arg-type]
                for a in ("harmless", "helpful")}
        judged_now = len(store) - before
    judge_wall = time.perf_counter() - judge_start
    elo = EloSummary(judge=judge.model_id, bootstrap=config.bootstrap, prior=config.prior,
                     harmless=_axis_summary("harmless", labelers["harmless"], names, rows["harmless"], config),
                     helpful=_axis_summary("helpful", labelers["helpful"], names, rows["helpful"], config))
    refusals = None
    if "benign" in sets or "harmful" in sets:
        refusals = _rate_refusals(config, judge, refusal_template, answers, sets, progress)
    summary = PolicyEvalSummary(
        out=str(out), policies=config.policies, answers=len(answers),
        judged_pairs=len(rows["harmless"]) + len(rows["helpful"]),
        refusal_judgements=sum(r.benign_refusal_judge.n + r.harmful_compliance_judge.n for r in refusals.policies)
        if refusals else 0,
        wall_seconds=round(time.perf_counter() - start, 3),
        seconds_per_judged_pair=round(judge_wall / judged_now, 4) if judged_now else None, elo=elo, refusals=refusals,
    )
    (out / "elo.json").write_text(elo.model_dump_json(indent=2))
    if refusals is not None:
        (out / "refusals.json").write_text(refusals.model_dump_json(indent=2))
    (out / "summary.json").write_text(summary.model_dump_json(indent=2))
    plot_elo(elo, out / "elo.png")
    return summary


def _rate_refusals(config: PolicyEvalConfig, judge: Engine, template: RefusalTemplate,
                   answers: dict[tuple[str, str, int], AnswerRecord], sets: dict[str, list[list[Message]]],
                   progress: bool) -> RefusalSummary:
    """Judge and rule verdicts on every benign/harmful reply (resumable), then the rates per policy."""
    with JsonlStore(Path(config.out) / "refusals.jsonl", RefusalRecord, stage="eval-refusals",
                    config={"judge": judge.model_id, "template": sha256_of(template.model_dump())},
                    force=config.force) as store:
        replies = judge_replies(judge, template, answers, store, config.batch_size, progress)
    return RefusalSummary(
        judge=judge.model_id, template=template.name, benign_prompts=len(sets.get("benign", [])),
        harmful_prompts=len(sets.get("harmful", [])), patterns=list(REFUSAL_PATTERNS),
        policies=[refusal_rates(p.name, [(r.prompt_set, r.p_refuse, r.rule_pattern is not None)
                                         for r in replies if r.policy == p.name]) for p in config.policies],
    )


def plot_elo(elo: EloSummary, path: Path) -> Path:
    """Harmlessness Elo (x) against helpfulness Elo (y), 95% intervals as error bars, one point per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for h, g in zip(elo.harmless.policies, elo.helpful.policies):
        ax.errorbar([h.elo], [g.elo], xerr=[[h.elo - h.low], [h.high - h.elo]],
                    yerr=[[g.elo - g.low], [g.high - g.elo]], fmt="o", capsize=4, label=h.policy)
        ax.annotate(h.policy, (h.elo, g.elo), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.margins(0.2)
    ax.axhline(1000, color="lightgrey", linewidth=0.8)
    ax.axvline(1000, color="lightgrey", linewidth=0.8)
    ax.set_xlabel(f"harmlessness Elo ({elo.harmless.prompts} red-team prompts)")
    ax.set_ylabel(f"helpfulness Elo ({elo.helpful.prompts} helpful prompts)")
    ax.set_title(f"judge {Path(elo.judge).name}; bars: 95% intervals", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
