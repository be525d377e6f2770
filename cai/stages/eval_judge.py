"""The judging half of `cai eval`: pairwise comparisons per axis and the refusal question per reply.

Pairwise: for every prompt of an axis and every two policies, the labeler of `cai label` (the same
class, prompts and soft-label math) compares the two answers under the axis's constitution, each
principle in both orders. Two identical answers get p = 0.5 without a judge call. Rows go through a
JsonlStore, so a killed run resumes with the pairs it has not judged.
"""

from __future__ import annotations

import itertools
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from cai.engines.base import Engine
from cai.hashing import record_id
from cai.stages.eval_answers import AnswerRecord
from cai.stages.eval_refusal import RefusalTemplate, judge_refusals, rule_refusal
from cai.stages.label import Labeler, LabelRecord
from cai.stages.pairs import Pair
from cai.store import JsonlStore

Axis = Literal["harmless", "helpful"]
AXIS_SET = {"harmless": "red_team", "helpful": "helpful"}  # which prompts each axis is judged on


class JudgedPair(BaseModel):
    """Two policies' answers to one prompt, judged on one axis. p = P(policy_a's answer is better)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    axis: Axis
    prompt_index: int
    policy_a: str
    policy_b: str
    answer_a: str = Field(description="id of policy_a's AnswerRecord")
    answer_b: str
    p: float
    identical: bool = Field(description="the answers are the same text: p = 0.5, no judge call")
    label: LabelRecord | None = Field(description="the labeler's full judgement with provenance (None if identical)")


def judge_axis(
    axis: Axis, labeler: Labeler, policies: list[str], answers: dict[tuple[str, str, int], AnswerRecord],
    store: JsonlStore[JudgedPair], batch_size: int, progress: bool,
) -> list[JudgedPair]:
    """Judge every prompt x policy pair of the axis not yet in `store`; returns all of the axis's rows."""
    prompt_set = AXIS_SET[axis]
    indices = sorted({i for (_, s, i) in answers if s == prompt_set})
    jobs = []
    for i in indices:
        for pa, pb in itertools.combinations(policies, 2):
            a, b = answers[(pa, prompt_set, i)], answers[(pb, prompt_set, i)]
            jobs.append((record_id(axis, a.id, b.id, store.config_hash), i, pa, pb, a, b))
    todo = [j for j in jobs if j[0] not in store]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"judge {axis}", unit="pair",
               disable=not progress)
    for b0 in range(0, len(todo), batch_size):
        batch = todo[b0 : b0 + batch_size]
        same = [j for j in batch if " ".join(j[4].response.split()) == " ".join(j[5].response.split())]
        diff = [j for j in batch if j not in same]
        pairs = [Pair(prompt=a.prompt, response_a=a.response, response_b=b.response, source_index=i + 1,
                      source_id=a.id) for _, i, _, _, a, b in diff]
        for (rid, i, pa, pb, a, b), pair, labels in zip(diff, pairs, labeler.judge(pairs) if pairs else []):
            rec = labeler.record(rid, pair, labels, "policy", sampling_extra={"eval_axis": axis})
            store.append(JudgedPair(id=rid, axis=axis, prompt_index=i, policy_a=pa, policy_b=pb, answer_a=a.id,
                                    answer_b=b.id, p=rec.label_prob, identical=False, label=rec))
        for rid, i, pa, pb, a, b in same:
            store.append(JudgedPair(id=rid, axis=axis, prompt_index=i, policy_a=pa, policy_b=pb, answer_a=a.id,
                                    answer_b=b.id, p=0.5, identical=True, label=None))
        bar.update(len(batch))
    bar.close()
    ids = {j[0] for j in jobs}
    return [r for r in store.records() if r.id in ids]


class RefusalRecord(BaseModel):
    """The judge's and the phrase rule's verdict on one reply to a benign or harmful prompt."""

    model_config = ConfigDict(extra="forbid")

    id: str
    answer: str = Field(description="id of the AnswerRecord")
    policy: str
    prompt_set: Literal["benign", "harmful"]
    prompt_index: int
    p_refuse: float
    p_refuse_first: float
    p_refuse_second: float
    rule_pattern: str | None = Field(description="the refusal pattern that matched, None if none did")
    judge_model: str
    template: str


def judge_replies(
    engine: Engine, template: RefusalTemplate, answers: dict[tuple[str, str, int], AnswerRecord],
    store: JsonlStore[RefusalRecord], batch_size: int, progress: bool,
) -> list[RefusalRecord]:
    """The refusal question for every benign/harmful answer not yet in `store`; returns all such rows."""
    jobs = [(record_id(a.id, store.config_hash), a) for a in answers.values() if a.prompt_set in ("benign", "harmful")]
    todo = [j for j in jobs if j[0] not in store]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="refusals", unit="reply", disable=not progress)
    for b0 in range(0, len(todo), batch_size):
        batch = todo[b0 : b0 + batch_size]
        verdicts = judge_refusals(engine, template, [(a.prompt, a.response) for _, a in batch])
        for (rid, a), v in zip(batch, verdicts):
            store.append(RefusalRecord(
                id=rid, answer=a.id, policy=a.policy, prompt_set=a.prompt_set, prompt_index=a.prompt_index,  # type: ignore[arg-type]
                p_refuse=v.p_refuse, p_refuse_first=v.p_refuse_first, p_refuse_second=v.p_refuse_second,
                rule_pattern=rule_refusal(a.response), judge_model=engine.model_id, template=template.name,
            ))
        bar.update(len(batch))
    bar.close()
    ids = {rid for rid, _ in jobs}
    return [r for r in store.records() if r.id in ids]
