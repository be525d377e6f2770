"""`cai run`: critique-revise -> AI labels -> mix -> reward model -> SFT -> PPO -> eval in one run directory,
resumable as a whole.

Why it looks like this:
- A stage runs the same function as its own command, with a config built from three layers: the
  shared top-level fields (model, engine, seed, constitution) as defaults, the stage's section of
  the pipeline YAML over them, and the paths between stages, which the pipeline owns (derived from
  run_dir), so one stage can never silently read another run's data.
- Every stage config is validated before the first stage starts: a typo in the PPO section fails
  in a second with its file:line, not after the data stages have run for half an hour.
- run_dir/pipeline.json records, per stage, a key (hash of its resolved config, the content of its
  input files and the keys of the stages it reads from), its status and its wall time. A stage is
  skipped when it is done under the same key and its outputs are still as it left them; otherwise
  it runs and resumes from what it already wrote (JSONL stores skip rows on disk, trainers restart
  from their newest checkpoint). A stage whose key changed is refused, never mixed with old
  outputs, until `restart` moves it and every stage that reads from it aside.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai import __version__
from cai.errors import CaiError, InputError
from cai.hashing import sha256_of
from cai.locking import lock_run_dir
from cai.textio import read_json
from cai.yamlio import LocatedYaml, load_yaml

LOG = "pipeline.json"
RESOLVED = "config.json"
# Where each stage writes, relative to run_dir: fixed, so every path between stages is known
# from run_dir alone.
LAYOUT = {
    "generate": "generate/critique.jsonl",
    "label": "label/labels.jsonl",
    "label_eval": "label_eval",
    "mix": "mix",
    "rm": "rm",
    "sft": "sft",
    "ppo": "ppo",
    "eval": "eval",
}
EngineFactory = Callable[[str, "str | None", dict[str, Any]], Any]


class PipelineConfig(BaseModel):
    """A pipeline YAML: shared fields at the top, one section per stage (the fields of its command's
    config, minus the paths the pipeline derives)."""

    model_config = ConfigDict(extra="forbid")

    run_dir: Path = Field(description="every stage writes under run_dir/<stage>")
    model: str | None = Field(None, description="base model of every stage; None = the bundled Gemma 3 270M")
    engine: Literal["hf", "vllm"] = Field("hf", description="generation engine of the data stages")
    engine_options: dict[str, Any] = Field(default_factory=dict, description="engine constructor options")
    seed: int = 0
    constitution: Path | None = Field(None, description="default constitution of generate and label")
    generate: dict[str, Any] = Field(default_factory=dict)
    label: dict[str, Any] = Field(default_factory=dict)
    label_eval: dict[str, Any] | None = Field(None, description="optional: labeler vs human labels")
    mix: dict[str, Any] = Field(default_factory=dict)
    rm: dict[str, Any] = Field(default_factory=dict)
    sft: dict[str, Any] = Field(default_factory=dict)
    ppo: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict, description="policy eval: Elo per axis, over-refusal")
    compare: dict[str, Any] | None = Field(None, description="deprecated: the old name of `eval`")


# ---------------------------------------------------------------- stages


class RunContext:
    """What stages share while one pipeline runs: the loaded generation engine and output options."""

    def __init__(self, engine_factory: EngineFactory | None = None, progress: bool = True):
        self.engine_factory = engine_factory or _load_engine
        self.progress = progress
        self._engine: tuple[str, Any] | None = None

    def engine(self, kind: str, model: str | None, options: dict[str, Any]) -> Any:
        """The engine for (kind, model, options), reused across stages; loading another frees the old one."""
        key = sha256_of([kind, model, options])
        if self._engine is None or self._engine[0] != key:
            self.release()
            self._engine = (key, self.engine_factory(kind, model, options))
        return self._engine[1]

    def release(self) -> None:
        """Drop the engine before training or another engine, so they get its memory (a vLLM engine
        holds its GPU share until it is shut down: engines with `close()` are closed)."""
        if self._engine is not None and callable(getattr(self._engine[1], "close", None)):
            self._engine[1].close()
        self._engine = None
        gc.collect()


def _load_engine(kind: str, model: str | None, options: dict[str, Any]) -> Any:
    from cai.engines import load_engine

    return load_engine(kind, model, **options)


class Stage(ABC):
    """One step of the pipeline. Subclasses say which config they build and how they run it."""

    name: str
    title: str
    after: tuple[str, ...] = ()  # stages whose outputs this one reads
    volatile: frozenset[str] = frozenset()  # config fields that do not change the outputs
    trainer: bool = False

    @abstractmethod
    def config_class(self) -> type[BaseModel]: ...

    def enabled(self, pipe: PipelineConfig) -> bool:
        return True

    def section(self, pipe: PipelineConfig) -> dict[str, Any]:
        return dict(getattr(pipe, self.name) or {})

    def shared(self, pipe: PipelineConfig, configs: dict[str, BaseModel]) -> dict[str, Any]:
        """Defaults from the top-level fields; the stage's section overrides them."""
        return {}

    @abstractmethod
    def owned(self, run_dir: Path) -> dict[str, Any]:
        """Fields the pipeline sets (paths between stages, from run_dir); a section may not set them."""

    def inputs(self, config: Any) -> list[Path]:
        """Files from outside the run whose content the outputs depend on."""
        return []

    @abstractmethod
    def outputs(self, config: Any) -> list[Path]:
        """Files that exist once the stage is done (their sizes are recorded and checked)."""

    @abstractmethod
    def run(self, config: Any, ctx: RunContext) -> BaseModel:
        """Run (or resume) the stage; returns its summary."""


# Where a data stage runs does not change its rows, so it is not part of the stage's key.
EXECUTOR_FIELDS = ("executor", "ray_address", "ray_workers", "ray_gpus_per_worker", "ray_cpus_per_worker")


def _local_engine(config: Any, ctx: RunContext) -> Any:
    """The pipeline's shared engine for a data stage run in this process; None under Ray, whose
    actors build their own."""
    return None if config.executor == "ray" else ctx.engine(config.engine, config.model, config.engine_options)


def _file(path: Path | str | None) -> list[Path]:
    return [Path(path)] if path is not None else []


class GenerateStage(Stage):
    name, title = "generate", "critique-revise"
    volatile = frozenset({"batch_size", "force", *EXECUTOR_FIELDS})

    def config_class(self) -> type[BaseModel]:
        from cai.stages.critique import CritiqueConfig

        return CritiqueConfig

    def shared(self, pipe: PipelineConfig, configs: dict[str, BaseModel]) -> dict[str, Any]:
        out = {"model": pipe.model, "engine": pipe.engine, "engine_options": pipe.engine_options, "seed": pipe.seed}
        return out | ({"constitution": pipe.constitution} if pipe.constitution else {})

    def owned(self, run_dir: Path) -> dict[str, Any]:
        return {"out": run_dir / LAYOUT["generate"], "shard": None}

    def inputs(self, config: Any) -> list[Path]:
        return [Path(config.prompts), Path(config.constitution)]

    def outputs(self, config: Any) -> list[Path]:
        return [Path(config.out), Path(f"{config.out}.summary.json")]

    def run(self, config: Any, ctx: RunContext) -> BaseModel:
        from cai.stages.critique import run_critique

        return run_critique(config, engine=_local_engine(config, ctx), progress=ctx.progress)


class LabelStage(Stage):
    name, title, after = "label", "AI feedback labels", ("generate",)
    volatile = frozenset({"batch_size", "force", *EXECUTOR_FIELDS})

    def config_class(self) -> type[BaseModel]:
        from cai.stages.label import LabelConfig

        return LabelConfig

    def shared(self, pipe: PipelineConfig, configs: dict[str, BaseModel]) -> dict[str, Any]:
        out = {"model": pipe.model, "engine": pipe.engine, "engine_options": pipe.engine_options, "seed": pipe.seed}
        return out | ({"constitution": pipe.constitution} if pipe.constitution else {})

    def owned(self, run_dir: Path) -> dict[str, Any]:
        return {"critique": run_dir / LAYOUT["generate"], "pairs": None, "prompts": None,
                "out": run_dir / LAYOUT["label"], "shard": None}

    def inputs(self, config: Any) -> list[Path]:
        return [Path(config.constitution), *_file(config.feedback_templates)]

    def outputs(self, config: Any) -> list[Path]:
        return [Path(config.out), Path(f"{config.out}.metrics.json")]

    def run(self, config: Any, ctx: RunContext) -> BaseModel:
        from cai.stages.label import run_label

        return run_label(config, engine=_local_engine(config, ctx), progress=ctx.progress)


class LabelEvalStage(Stage):
    """Optional: the label stage's labeler judges human-labelled pairs (agreement, calibration)."""

    name, title, after = "label_eval", "labeler vs humans", ("label",)
    volatile = frozenset({"batch_size", "force"})

    def config_class(self) -> type[BaseModel]:
        from cai.stages.label_eval import EvalConfig

        return EvalConfig

    def enabled(self, pipe: PipelineConfig) -> bool:
        return pipe.label_eval is not None

    def shared(self, pipe: PipelineConfig, configs: dict[str, BaseModel]) -> dict[str, Any]:
        from cai.stages.label import LabelerSettings

        label = configs["label"].model_dump()
        return {k: label[k] for k in LabelerSettings.model_fields if k not in ("limit", "force")}

    def owned(self, run_dir: Path) -> dict[str, Any]:
        return {"out": run_dir / LAYOUT["label_eval"]}

    def inputs(self, config: Any) -> list[Path]:
        return [Path(config.pairs), Path(config.constitution), *_file(config.feedback_templates)]

    def outputs(self, config: Any) -> list[Path]:
        out = Path(config.out)
        return [out / "labels.jsonl", out / "metrics.json", out / "calibration.png"]

    def run(self, config: Any, ctx: RunContext) -> BaseModel:
        from cai.stages.label_eval import run_label_eval

        engine = ctx.engine(config.engine, config.model, config.engine_options)
        return run_label_eval(config, engine=engine, progress=ctx.progress)


class MixStage(Stage):
    name, title, after = "mix", "reward-model data mix", ("label",)

    def config_class(self) -> type[BaseModel]:
        from cai.stages.mix import MixConfig

        return MixConfig

    def shared(self, pipe: PipelineConfig, configs: dict[str, BaseModel]) -> dict[str, Any]:
        return {"seed": pipe.seed}

    def owned(self, run_dir: Path) -> dict[str, Any]:
        return {"ai": [run_dir / LAYOUT["label"]], "out": run_dir / LAYOUT["mix"]}

    def inputs(self, config: Any) -> list[Path]:
        return [Path(p) for p in config.human]

    def outputs(self, config: Any) -> list[Path]:
        out = Path(config.out)
        return [out / "train.jsonl", out / "test.jsonl", out / "mix.json"]

    def run(self, config: Any, ctx: RunContext) -> BaseModel:
        from cai.stages.mix import run_mix

        return run_mix(config)


class TrainerStage(Stage):
    """A trainer: run_<x>(config, resume=...) writing final/ and summary.json into config.out_dir.
    It resumes from its newest checkpoint; with none, it starts over."""

    trainer = True

    def shared(self, pipe: PipelineConfig, configs: dict[str, BaseModel]) -> dict[str, Any]:
        return {"model": pipe.model, "seed": pipe.seed}

    def outputs(self, config: Any) -> list[Path]:
        out = Path(config.out_dir)
        return [out / "summary.json", out / "final" / "config.json", out / "final" / "model.safetensors"]

    @abstractmethod
    def train(self, config: Any, resume: bool, progress: bool) -> BaseModel: ...

    def run(self, config: Any, ctx: RunContext) -> BaseModel:
        from cai.train.common import CHECKPOINTS, STATE_JSON

        ctx.release()
        out = Path(config.out_dir)
        resume = any((p / STATE_JSON).is_file() for p in (out / CHECKPOINTS).glob("step-*"))
        if not resume and out.exists() and _world_size() == 1:
            shutil.rmtree(out)  # leftovers of a run killed before its first checkpoint
        return self.train(config, resume, ctx.progress)


class RewardStage(TrainerStage):
    name, title, after = "rm", "reward model", ("mix",)

    def config_class(self) -> type[BaseModel]:
        from cai.train.reward import RewardConfig

        return RewardConfig

    def owned(self, run_dir: Path) -> dict[str, Any]:
        mix = run_dir / LAYOUT["mix"]
        return {"train_file": str(mix / "train.jsonl"), "test_file": str(mix / "test.jsonl"),
                "out_dir": str(run_dir / LAYOUT["rm"])}

    def train(self, config: Any, resume: bool, progress: bool) -> BaseModel:
        from cai.train.reward import run_reward

        return run_reward(config, resume=resume, progress=progress)


class SFTStage(TrainerStage):
    name, title, after = "sft", "supervised fine-tuning", ("generate",)

    def config_class(self) -> type[BaseModel]:
        from cai.train.sft import SFTConfig

        return SFTConfig

    def owned(self, run_dir: Path) -> dict[str, Any]:
        return {"train_file": str(run_dir / LAYOUT["generate"]), "test_file": None,
                "out_dir": str(run_dir / LAYOUT["sft"])}

    def train(self, config: Any, resume: bool, progress: bool) -> BaseModel:
        from cai.train.sft import run_sft

        return run_sft(config, resume=resume, progress=progress)


class PPOStage(TrainerStage):
    """The SFT policy trained against the reward model; by default on the generate stage's red-team
    prompts plus the prompts of the human pairs."""

    name, title, after = "ppo", "PPO", ("generate", "mix", "rm", "sft")

    def config_class(self) -> type[BaseModel]:
        from cai.train.ppo import PPOConfig

        return PPOConfig

    def shared(self, pipe: PipelineConfig, configs: dict[str, BaseModel]) -> dict[str, Any]:
        gen, mix = configs["generate"], configs["mix"]
        prompts = [{"file": str(gen.prompts), "kind": "prompts", "limit": gen.limit}]  # type: ignore[attr-defined]
        prompts += [{"file": str(h), "kind": "pairs"} for h in mix.human]  # type: ignore[attr-defined]
        return {"seed": pipe.seed, "prompts": prompts, "rollout_engine": pipe.engine}  # vllm: colocated rollouts

    def owned(self, run_dir: Path) -> dict[str, Any]:
        return {"model": str(run_dir / LAYOUT["sft"] / "final"), "reward_model": str(run_dir / LAYOUT["rm"] / "final"),
                "out_dir": str(run_dir / LAYOUT["ppo"])}

    def inputs(self, config: Any) -> list[Path]:
        return [Path(p.file) for p in config.prompts]

    def train(self, config: Any, resume: bool, progress: bool) -> BaseModel:
        from cai.train.ppo import run_ppo

        return run_ppo(config, resume=resume, progress=progress)


class EvalStage(Stage):
    """The initial, SL-CAI and RL-CAI policies rated by the AI judge (cai/stages/eval.py): Elo per axis on
    the red-team prompts generate did not use and on held-out helpful prompts, plus over-refusal.

    `compare` (the old before/after RM-score check) is read as a deprecated alias of this section."""

    name, title, after = "eval", "policy eval (Elo, refusals)", ("generate", "sft", "ppo")
    volatile = frozenset({"batch_size", "force"})

    def config_class(self) -> type[BaseModel]:
        from cai.stages.eval import PolicyEvalConfig

        return PolicyEvalConfig

    def section(self, pipe: PipelineConfig) -> dict[str, Any]:
        if pipe.compare is None:
            return dict(pipe.eval)
        if pipe.eval:
            raise CaiError("the pipeline has both `compare` and `eval` sections; `compare` is the old name of "
                           "`eval`: merge them into `eval`")
        renamed = {"limit": "red_team_limit", "prompts": "red_team", "skip": "red_team_skip"}
        section = {renamed.get(k, k): v for k, v in pipe.compare.items()}
        warnings.warn(
            "pipeline section `compare` is deprecated: it is now `eval`, which rates the initial, SFT and PPO "
            "policies with the AI judge instead of the reward model (limit is read as red_team_limit). Rename the "
            "section to `eval` (see examples/pipeline.yaml).", FutureWarning, stacklevel=2)
        return section

    def shared(self, pipe: PipelineConfig, configs: dict[str, BaseModel]) -> dict[str, Any]:
        gen, label = configs["generate"], configs["label"]
        run_dir = pipe.run_dir
        policies = [{"name": "initial", "model": pipe.model},
                    {"name": "sl-cai", "model": str(run_dir / LAYOUT["sft"] / "final")},
                    {"name": "rl-cai", "model": str(run_dir / LAYOUT["ppo"] / "final")}]
        return {"policies": policies, "red_team": gen.prompts, "red_team_skip": gen.limit or 0,  # type: ignore[attr-defined]
                "judge_model": label.model, "engine": pipe.engine,  # type: ignore[attr-defined]
                "engine_options": pipe.engine_options, "seed": pipe.seed}

    def owned(self, run_dir: Path) -> dict[str, Any]:
        return {"out": run_dir / LAYOUT["eval"]}

    def inputs(self, config: Any) -> list[Path]:
        files = [config.red_team, config.helpful, config.benign, config.harmful, config.harmless_constitution,
                 config.helpful_constitution, config.feedback_templates, config.refusal_template]
        return [Path(f) for f in files if f is not None]

    def outputs(self, config: Any) -> list[Path]:
        out = Path(config.out)
        return [out / "answers.jsonl", out / "judged.jsonl", out / "elo.json", out / "elo.png", out / "summary.json"]

    def run(self, config: Any, ctx: RunContext) -> BaseModel:
        from cai.stages.eval import run_policy_eval

        return run_policy_eval(config, lambda model: ctx.engine(config.engine, model, config.engine_options),
                               progress=ctx.progress)


STAGES: tuple[Stage, ...] = (
    GenerateStage(), LabelStage(), LabelEvalStage(), MixStage(), RewardStage(), SFTStage(), PPOStage(), EvalStage(),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise CaiError(f"unknown stage {name!r}; the stages are: {', '.join(STAGE_NAMES)}")


def downstream(names: Iterable[str]) -> list[str]:
    """The given stages and every stage that reads from them, in pipeline order."""
    hit = set(names)
    for s in STAGES:
        if any(a in hit for a in s.after):
            hit.add(s.name)
    return [s.name for s in STAGES if s.name in hit]


# ---------------------------------------------------------------- loading


class Pipeline(BaseModel):
    """A validated pipeline: the top-level config and every enabled stage's resolved config."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    config: PipelineConfig
    stages: dict[str, Any]  # stage name -> its config model, in pipeline order


def _apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    target = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = target.setdefault(part, {})
        if nxt is None:
            nxt = target[part] = {}
        if not isinstance(nxt, dict):
            raise InputError("<command line>", f"--set {key}: {part} is not a section")
        target = nxt
    target[parts[-1]] = value


def _errors(doc: LocatedYaml, err: ValidationError, prefix: tuple[str, ...], overridden: set[str],
            owned: Iterable[str] = ()) -> list[str]:
    """One 'file:line: field: message' (or '--set: ...') per pydantic error of a section."""
    out = []
    for raw in err.errors():
        loc = prefix + tuple(str(p) for p in raw["loc"])
        field = ".".join(loc)
        msg = {"extra_forbidden": "unknown key", "missing": "required field is missing"}.get(raw["type"], raw["msg"])
        from_set = any(field == k or field.startswith(k + ".") or k.startswith(field + ".") for k in overridden)
        where = "--set" if from_set else f"{doc.path}:{doc.line_of(loc)}"
        note = " (a path the pipeline sets; leave it out)" if raw["loc"] and str(raw["loc"][0]) in owned else ""
        out.append(f"{where}: {field}: {msg}{note}")
    return out


def load_pipeline(path: str | Path, overrides: dict[str, Any] | None = None) -> Pipeline:
    """Read a pipeline YAML (+ `stage.field=value` overrides) and resolve every stage's config.
    All errors are collected and reported together with their file:line (or --set)."""
    doc = load_yaml(path)
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise InputError(str(doc.path), "expected a mapping at the top level", line=1)
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        _apply_override(data, key, value)
    try:
        pipe = PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise CaiError(f"invalid pipeline {doc.path}: " + "; ".join(_errors(doc, err, (), set(overrides)))) from None
    problems: list[str] = []
    configs: dict[str, BaseModel] = {}
    for s in STAGES:
        if not s.enabled(pipe):
            continue
        section = s.section(pipe)
        owned = s.owned(pipe.run_dir)
        clash = sorted(set(section) & set(owned))
        for key in clash:
            line = doc.line_of((s.name, key))
            problems.append(f"{doc.path}:{line}: {s.name}.{key}: set by the pipeline (to {owned[key]}), leave it out")
        try:
            shared = s.shared(pipe, configs)
        except KeyError:  # it takes defaults from an earlier stage whose config is invalid (reported already)
            continue
        try:
            configs[s.name] = s.config_class().model_validate({**shared, **section, **owned})
        except ValidationError as err:
            problems += _errors(doc, err, (s.name,), set(overrides), set(owned))
    if problems:
        raise CaiError(f"invalid pipeline {doc.path}: " + "; ".join(problems))
    return Pipeline(config=pipe, stages=configs)


# ---------------------------------------------------------------- the run log


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StageRecord(BaseModel):
    """What run_dir/pipeline.json says about one stage."""

    model_config = ConfigDict(extra="forbid")

    key: str
    status: Literal["running", "done"]
    attempts: int = 0
    wall_s: float = Field(0.0, description="summed over attempts (a resumed stage counts both)")
    started_at: str
    finished_at: str | None = None
    outputs: dict[str, int] = Field(default_factory=dict, description="output file -> size in bytes when done")
    summary: dict[str, Any] | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class RunLog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cai_version: str = __version__
    stages: dict[str, StageRecord] = Field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> RunLog:
        p = Path(run_dir) / LOG
        if not p.exists():
            return cls()
        try:
            return cls.model_validate(read_json(p))
        except ValidationError as e:
            raise InputError(str(p), f"is not a cai run log ({e.errors()[0]['msg']}); move it away to start the "
                             "run log afresh (finished stages will run again)") from None

    def save(self, run_dir: Path) -> None:
        if not _is_main_process():
            return
        p = Path(run_dir) / LOG
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, p)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _sizes(paths: list[Path]) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in paths if p.exists()}


def stage_keys(pipeline: Pipeline) -> dict[str, str]:
    """Per stage: a hash of its resolved config (less volatile fields), its input files' content and
    the keys of the stages it reads from."""
    keys: dict[str, str] = {}
    for name, cfg in pipeline.stages.items():
        s = stage(name)
        files = {str(p): sha256_of(p.read_bytes()) if p.is_file() else None for p in s.inputs(cfg)}
        upstream = {a: keys.get(a) for a in s.after}
        keys[name] = sha256_of([name, cfg.model_dump(mode="json", exclude=set(s.volatile)), files, upstream])[:16]
    return keys


StageStatus = Literal["done", "partial", "pending", "changed", "disabled"]


class PlanItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    status: StageStatus
    detail: str = ""


def plan(pipeline: Pipeline, log: RunLog | None = None) -> list[PlanItem]:
    """What `run` would do with each stage: skip it (done), resume it (partial), start it (pending),
    or refuse it (changed: done or started under another key)."""
    log = log or RunLog.load(pipeline.config.run_dir)
    keys = stage_keys(pipeline)
    items = []
    for s in STAGES:
        if s.name not in pipeline.stages:
            items.append(PlanItem(stage=s.name, status="disabled", detail="no section in the pipeline YAML"))
            continue
        rec = log.stages.get(s.name)
        cfg = pipeline.stages[s.name]
        if rec is None:
            started = any(p.exists() for p in s.outputs(cfg)) or Path(pipeline.config.run_dir / s.name).exists()
            items.append(PlanItem(stage=s.name, status="partial" if started else "pending"))
        elif rec.key != keys[s.name]:
            changed = _changed_fields(rec.config, cfg.model_dump(mode="json", exclude=set(s.volatile)))
            items.append(PlanItem(stage=s.name, status="changed", detail=changed or "an input file or an earlier stage changed"))
        elif rec.status == "done" and _sizes(s.outputs(cfg)) == rec.outputs:
            items.append(PlanItem(stage=s.name, status="done", detail=f"{rec.wall_s:.1f}s"))
        else:
            why = "interrupted" if rec.status == "running" else "outputs changed since it finished"
            items.append(PlanItem(stage=s.name, status="partial", detail=why))
    return items


def _changed_fields(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "changed: " + ", ".join(keys) if keys else ""


def restart(pipeline: Pipeline, names: Iterable[str]) -> list[str]:
    """Move the outputs of the named stages and of every stage after them to run_dir/.old/<time>/
    and forget them in the log. Returns the stages moved."""
    run_dir = Path(pipeline.config.run_dir)
    moved = downstream(names)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = RunLog.load(run_dir)
    for name in moved:
        src = run_dir / name
        if src.exists():
            dst = run_dir / ".old" / stamp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        log.stages.pop(name, None)
    log.save(run_dir)
    return moved


# ---------------------------------------------------------------- running


class StageResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    status: Literal["skipped", "ran", "disabled"]
    wall_s: float  # this invocation (0 when skipped)
    total_wall_s: float  # over every attempt


def run_pipeline(pipeline: Pipeline, until: str | None = None, engine_factory: EngineFactory | None = None,
                 progress: bool = True, echo: Callable[[str], None] = print) -> list[StageResult]:
    """Run every enabled stage in order (up to `until`), skipping done ones and resuming partial ones."""
    run_dir = Path(pipeline.config.run_dir)
    if until is not None:
        stage(until)
    items = plan(pipeline)
    if until is not None:
        items = items[: [i.stage for i in items].index(until) + 1]
    refused = [i for i in items if i.status == "changed"]
    if refused:
        lines = "; ".join(f"{i.stage} ({i.detail})" for i in refused)
        raise CaiError(
            f"{run_dir} holds stages run with other settings: {lines}. Rerun with the settings they used, "
            f"pass --restart {refused[0].stage} to move it and the stages after it aside, or use a new run_dir."
        )
    if _world_size() > 1:
        data = [i.stage for i in items if i.status in ("pending", "partial") and not stage(i.stage).trainer]
        if data:
            raise CaiError(f"under a multi-process launcher every process would run {', '.join(data)}; run the "
                           f"data stages first without it (`cai run ... --until mix`), then launch again")
    run_dir.mkdir(parents=True, exist_ok=True)
    # one `cai run` per run dir; released on return or error, or when the process ends
    run_lock = lock_run_dir(run_dir) if _is_main_process() else None
    try:
        return _run_items(pipeline, items, run_dir, engine_factory, progress, echo)
    finally:
        if run_lock is not None:
            run_lock.release()


def _run_items(pipeline: Pipeline, items: list[PlanItem], run_dir: Path, engine_factory: EngineFactory | None,
               progress: bool, echo: Callable[[str], None]) -> list[StageResult]:
    """The stages of `items` in order, while `run_pipeline` holds the run dir's lock."""
    if _is_main_process():
        (run_dir / RESOLVED).write_text(json.dumps(
            {"pipeline": pipeline.config.model_dump(mode="json"),
             "stages": {k: v.model_dump(mode="json") for k, v in pipeline.stages.items()}}, indent=2))
    keys = stage_keys(pipeline)
    ctx = RunContext(engine_factory, progress)
    results: list[StageResult] = []
    enabled = [i for i in items if i.status != "disabled"]
    for n, item in enumerate(enabled, start=1):
        s, cfg = stage(item.stage), pipeline.stages[item.stage]
        log = RunLog.load(run_dir)
        rec = log.stages.get(s.name)
        if item.status == "done" and rec is not None:
            echo(f"[{n}/{len(enabled)}] {s.name}: done, skipped ({rec.wall_s:.1f}s when it ran)")
            results.append(StageResult(stage=s.name, status="skipped", wall_s=0.0, total_wall_s=rec.wall_s))
        else:
            how = "resuming" if item.status == "partial" else "starting"
            echo(f"[{n}/{len(enabled)}] {s.name} ({s.title}): {how}")
            results.append(_run_stage(s, cfg, keys[s.name], ctx, run_dir, echo))
    ctx.release()
    return results


def _run_stage(s: Stage, cfg: Any, key: str, ctx: RunContext, run_dir: Path,
               echo: Callable[[str], None]) -> StageResult:
    log = RunLog.load(run_dir)
    old = log.stages.get(s.name)
    rec = StageRecord(
        key=key, status="running", attempts=(old.attempts if old else 0) + 1, wall_s=old.wall_s if old else 0.0,
        started_at=utc_now(), config=cfg.model_dump(mode="json", exclude=set(s.volatile)),
    )
    log.stages[s.name] = rec
    log.save(run_dir)
    start = time.perf_counter()
    try:
        summary = s.run(cfg, ctx)
    finally:
        wall = time.perf_counter() - start
        log = RunLog.load(run_dir)
        rec.wall_s = round(rec.wall_s + wall, 2)
        log.stages[s.name] = rec
        log.save(run_dir)
    rec.status, rec.finished_at = "done", utc_now()
    rec.outputs = _sizes(s.outputs(cfg))
    missing = [str(p) for p in s.outputs(cfg) if str(p) not in rec.outputs]
    if missing and _is_main_process():
        raise CaiError(f"stage {s.name} finished without writing {', '.join(missing)}")
    rec.summary = summary.model_dump(mode="json")
    log.stages[s.name] = rec
    log.save(run_dir)
    echo(f"    {s.name}: done in {wall:.1f}s")
    return StageResult(stage=s.name, status="ran", wall_s=round(wall, 2), total_wall_s=rec.wall_s)
