"""Prompt sets read from `prompts/`: few-shot critique/revision dialogues and the feedback templates.

Everything here builds message lists; an engine's `render_chat` turns them into text (the tokenizer's
chat template, or an HH transcript for base models). The few-shot dialogues come first and are the
same for every row, so an engine can reuse their KV cache across a batch.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from cai.constitution import Principle
from cai.errors import CaiError
from cai.yamlio import load_model

CRITIQUE_PREFIX = "Critique:"
REVISION_PREFIX = "Revision:"
PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
FEEDBACK_FIELDS = ("conversation", "question", "response_a", "response_b")

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Msg = dict[str, str]


class FewShotExample(BaseModel):
    """One worked critique-revise dialogue, written in full so the model sees the expected shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Text
    response: Text
    critique_request: Text
    critique: Text
    revision_request: Text
    revision: Text


class FewShotSet(BaseModel):
    """The few-shot file a constitution refers to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Text
    response_preamble: Text = Field(description="said before the user's prompt when drafting the initial answer")
    examples: list[FewShotExample] = Field(min_length=1)


def _check_fields(template: str, allowed: tuple[str, ...]) -> str:
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = sorted(names - set(allowed))
    if unknown:
        raise ValueError(f"unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
                         f"allowed: {', '.join('{' + n + '}' for n in allowed)}")
    missing = sorted(set(allowed) - names)
    if missing:
        raise ValueError(f"template lacks {', '.join('{' + n + '}' for n in missing)}")
    return template


class FeedbackTemplate(BaseModel):
    """A multiple-choice question to the feedback model, and the words its answer turn starts with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request: Text
    answer_prefix: str = Field(description="opens the assistant turn; the choices (or reasoning) follow it")

    def model_post_init(self, _context: object) -> None:
        _check_fields(self.request, FEEDBACK_FIELDS)


class FeedbackTemplates(BaseModel):
    """Plain and chain-of-thought feedback prompts plus the answer tokens scored by log-prob."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Text
    choices: tuple[str, str] = Field(description="continuations scored after the answer prefix, A first")
    plain: FeedbackTemplate
    cot: FeedbackTemplate
    cot_answer_cue: str = Field(description="appended after the model's reasoning, before the choices")


def load_few_shot(path: str | Path) -> FewShotSet:
    """Few-shot critique/revision dialogues; errors name the file, line and field."""
    return load_model(path, FewShotSet)


def load_feedback_templates(path: str | Path | None = None) -> FeedbackTemplates:
    """Feedback templates from `path`, or the shipped `prompts/feedback.yaml`."""
    path = Path(path) if path is not None else PROMPTS_DIR / "feedback.yaml"
    if not path.is_file():
        raise CaiError(f"feedback templates not found: {path}")
    return load_model(path, FeedbackTemplates)


def _example_messages(ex: FewShotExample) -> list[Msg]:
    return [
        {"role": "user", "content": ex.prompt},
        {"role": "assistant", "content": ex.response},
        {"role": "user", "content": ex.critique_request},
        {"role": "assistant", "content": f"{CRITIQUE_PREFIX} {ex.critique}"},
        {"role": "user", "content": ex.revision_request},
        {"role": "assistant", "content": f"{REVISION_PREFIX} {ex.revision}"},
    ]


def few_shot_messages(fs: FewShotSet) -> list[Msg]:
    """All worked dialogues as one run of turns: the prefix shared by every critique/revision prompt."""
    return [m for ex in fs.examples for m in _example_messages(ex)]


def response_messages(fs: FewShotSet, conversation: list[Msg]) -> list[Msg]:
    """Messages for the initial answer; the engine opens the assistant turn."""
    return [{"role": "system", "content": fs.response_preamble}, *conversation]


def critique_messages(fs: FewShotSet, conversation: list[Msg], response: str, principle: Principle) -> list[Msg]:
    """Few-shot dialogues, then this conversation with `response` and the principle's critique request;
    render with `CRITIQUE_PREFIX` as the assistant prefix."""
    return [
        *few_shot_messages(fs),
        *conversation,
        {"role": "assistant", "content": response},
        {"role": "user", "content": principle.critique},
    ]


def revision_messages(
    fs: FewShotSet, conversation: list[Msg], response: str, principle: Principle, critique: str
) -> list[Msg]:
    """The critique prompt with its answer, then the revision request; render with `REVISION_PREFIX`."""
    return [
        *critique_messages(fs, conversation, response, principle),
        {"role": "assistant", "content": f"{CRITIQUE_PREFIX} {critique}"},
        {"role": "user", "content": principle.revision},
    ]


def format_conversation(conversation: list[Msg]) -> str:
    """A dialogue quoted inside a feedback question, one turn per line.

    Speakers are named 'User'/'Assistant' on single lines so that the quote cannot be mistaken for
    turns of the HH transcript the question itself sits in."""
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names[m['role']]}: {m['content'].strip()}" for m in conversation)


def feedback_messages(
    templates: FeedbackTemplates, conversation: list[Msg], response_a: str, response_b: str,
    principle: Principle, cot: bool = False,
) -> tuple[list[Msg], str]:
    """(messages, assistant prefix) asking which of two responses better meets the principle."""
    template = templates.cot if cot else templates.plain
    text = template.request.format(
        conversation=format_conversation(conversation), question=principle.feedback,
        response_a=response_a.strip(), response_b=response_b.strip(),
    )
    return [{"role": "user", "content": text}], template.answer_prefix


def answer_cue_after_reasoning(templates: FeedbackTemplates) -> str:
    """Text put after chain-of-thought reasoning so the next tokens are the answer choice."""
    return templates.cot_answer_cue
