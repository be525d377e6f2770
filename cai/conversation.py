"""Messages and the two text formats we speak: HH transcripts (base models) and chat templates."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Role = Literal["system", "user", "assistant"]

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
HH_STOP = (HUMAN, ASSISTANT)
_TURN = re.compile(r"\n\n(Human|Assistant):")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str


class TranscriptError(ValueError):
    """An HH transcript that does not alternate Human/Assistant turns as expected."""


def parse_hh(transcript: str) -> list[Message]:
    """Split an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages.

    Raises TranscriptError when it has no turns, text before the first turn, or two turns of the
    same speaker in a row.
    """
    parts = _TURN.split(transcript)
    if len(parts) < 3:
        raise TranscriptError("no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found")
    if parts[0].strip():
        raise TranscriptError(f"text before the first turn: {parts[0][:40]!r}")
    messages: list[Message] = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        role: Role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1].role == role:
            raise TranscriptError(f"two {speaker} turns in a row")
        messages.append(Message(role=role, content=text.strip()))
    if messages[0].role != "user":
        raise TranscriptError("the transcript starts with an Assistant turn")
    return messages


def to_hh(messages: list[Message] | list[dict[str, Any]], assistant_prefix: str | None = None) -> str:
    """Render messages as an HH transcript; with `assistant_prefix` (may be "") open an assistant turn.

    System messages are put first as plain text, as base models have no system role.
    """
    out: list[str] = []
    for m in messages:
        role, content = (m.role, m.content) if isinstance(m, Message) else (m["role"], m["content"])
        if role == "system":
            out.append(content.strip())
        else:
            out.append(f"{HUMAN if role == 'user' else ASSISTANT} {content.strip()}")
    text = "".join(out)
    if assistant_prefix is not None:
        text += ASSISTANT + (f" {assistant_prefix}" if assistant_prefix else "")
    return text


def split_prompt_response(messages: list[Message]) -> tuple[list[Message], Message]:
    """Split a dialogue into (context, final assistant turn); the context is what a response answers."""
    if not messages or messages[-1].role != "assistant":
        raise TranscriptError("the dialogue does not end with an Assistant turn")
    return messages[:-1], messages[-1]


def as_dicts(messages: list[Message]) -> list[dict[str, str]]:
    return [m.model_dump() for m in messages]
