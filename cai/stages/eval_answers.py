"""The answering half of `cai eval`: every policy answers every held-out prompt once.

Each (set, prompt) gets one seed derived from the run seed and the prompt's content, the same for
every policy (so policies are compared on the same draws, not on luck), and the answers go through
a JsonlStore keyed by (policy, model, set, prompt, sampling): a rerun answers only what is missing
and never loads a policy whose answers are all on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from cai import __version__
from cai.conversation import Message, as_dicts
from cai.engines.base import Engine, FinishReason, SamplingConfig
from cai.errors import CaiError
from cai.hashing import record_id
from cai.records import utc_now
from cai.stages.pairs import row_seed
from cai.store import JsonlStore

PromptSet = Literal["red_team", "helpful", "benign", "harmful"]
EngineFor = Callable[["str | None"], Engine]  # policy model -> a loaded engine


class PolicySpec(BaseModel):
    """A policy to evaluate: a name for tables and plots, and a model dir, run checkpoint or hub id."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=40)
    model: str | None = Field(None, description="None = the bundled Gemma 3 270M")

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError(f"policy name {v!r}: use letters, digits, '-', '_' or '.'")
        return v


class AnswerRecord(BaseModel):
    """One policy's answer to one held-out prompt."""

    model_config = ConfigDict(extra="forbid")

    id: str
    policy: str
    policy_model: str | None = Field(description="the policy's model as given (dir, checkpoint or hub id)")
    model: str = Field(description="the engine's model id")
    prompt_set: PromptSet
    prompt_index: int = Field(description="0-based position in the prompt set (after skip)")
    prompt: list[Message]
    response: str
    tokens: int
    finish: FinishReason
    seed: int
    engine: str
    sampling: dict[str, Any]
    cai_version: str = __version__
    created_at: str = Field(default_factory=utc_now)


def answer_id(policy: PolicySpec, prompt_set: str, conversation: list[Message], sampling: dict[str, Any]) -> str:
    """Keyed by the policy's name, not its path, so ids do not depend on where a run directory lives;
    `check_models` refuses a name that now points at another model."""
    return record_id(policy.name, prompt_set, as_dicts(conversation), sampling)


def check_models(policies: list[PolicySpec], store: JsonlStore[AnswerRecord]) -> None:
    """A resumed run must not mix answers of two models under one policy name."""
    given = {p.name: p.model for p in policies}
    for r in store.records():
        if r.policy in given and r.policy_model != given[r.policy]:
            raise CaiError(
                f"{store.path} holds answers of policy {r.policy!r} from model {r.policy_model}, but it is now "
                f"{given[r.policy]}. Give the new model another policy name, pass --force to start over, or use "
                "another output directory."
            )


def answer_all(
    policies: list[PolicySpec], sets: dict[str, list[list[Message]]], engine_for: EngineFor,
    store: JsonlStore[AnswerRecord], sampling: SamplingConfig, batch_size: int, progress: bool,
) -> dict[tuple[str, str, int], AnswerRecord]:
    """Answer every (policy, set, prompt) not yet in `store`; returns every answer by (policy, set, index)."""
    check_models(policies, store)
    params = sampling.model_dump(mode="json", exclude={"stop"})
    total = len(policies) * sum(len(v) for v in sets.values())
    bar = tqdm(total=total, desc="answer", unit="prompt", disable=not progress)
    for policy in policies:
        todo = [(s, i, conv) for s, convs in sets.items() for i, conv in enumerate(convs)
                if answer_id(policy, s, conv, params) not in store]
        bar.update(sum(len(v) for v in sets.values()) - len(todo))
        if not todo:
            continue
        engine = engine_for(policy.model)
        stop = SamplingConfig(**{**sampling.model_dump(), "stop": tuple(engine.stop_sequences)})
        for b in range(0, len(todo), batch_size):
            batch = todo[b : b + batch_size]
            seeds = [row_seed(sampling.seed, "answer", s, as_dicts(conv)) for s, _, conv in batch]
            gens = engine.generate([engine.render_chat(as_dicts(conv)) for _, _, conv in batch], stop, seeds=seeds)
            for (s, i, conv), seed, g in zip(batch, seeds, gens):
                store.append(AnswerRecord(
                    id=answer_id(policy, s, conv, params), policy=policy.name, policy_model=policy.model,
                    model=engine.model_id,
                    prompt_set=s, prompt_index=i, prompt=conv, response=g.text.strip(), tokens=g.completion_tokens,
                    finish=g.finish_reason, seed=seed, engine=engine.name, sampling=params,
                ))
            bar.update(len(batch))
    bar.close()
    wanted = {answer_id(p, s, conv, params): (p.name, s, i) for p in policies for s, convs in sets.items()
              for i, conv in enumerate(convs)}
    return {wanted[r.id]: r for r in store.records() if r.id in wanted}
