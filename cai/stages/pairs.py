"""Where preference pairs come from: files of pairs to label, critique-revise rows, policy samples,
and human-labelled pairs (HH-RLHF transcripts or prompt/chosen/rejected rows).

Every reader returns the conversation as messages that end with the user turn being answered, and
the responses as plain strings; errors name the file and line.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai.conversation import Message, TranscriptError, as_dicts, parse_hh, split_prompt_response
from cai.engines.base import Engine, SamplingConfig
from cai.errors import InputError
from cai.hashing import sha256_of
from cai.stages.inputs import iter_rows


class Pair(BaseModel):
    """Two responses to one conversation, in a fixed A/B order, waiting for a label."""

    model_config = ConfigDict(extra="forbid")

    prompt: list[Message]
    response_a: str
    response_b: str
    source_index: int = Field(description="line (or row) of the input it came from, 1-based")
    source_id: str | None = Field(None, description="the input row's own id, when it has one")

    def key(self) -> dict[str, Any]:
        """The content a label row id hashes."""
        return {"prompt": as_dicts(self.prompt), "a": self.response_a, "b": self.response_b}


class HumanPair(BaseModel):
    """A human comparison: `chosen` was judged better than `rejected` with probability `label_prob`."""

    model_config = ConfigDict(extra="forbid")

    prompt: list[Message]
    chosen: str
    rejected: str
    label_prob: float = Field(1.0, ge=0.0, le=1.0)
    line: int


class PreferenceRow(BaseModel):
    """The row trainers read: conversational prompt/chosen/rejected plus a soft label and its source."""

    model_config = ConfigDict(extra="forbid")

    id: str
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    label_prob: float = Field(ge=0.0, le=1.0, description="probability that chosen is better")
    source: str


def _messages(value: Any, path: str, line: int, field: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise InputError(path, "expected a non-empty list of {role, content} messages", line=line, field=field)
    try:
        return [Message.model_validate(m) for m in value]
    except ValidationError as e:
        first = e.errors()[0]
        raise InputError(path, f"bad message: {first['msg']}", line=line, field=field) from None


def _context(value: Any, path: str, line: int) -> list[Message]:
    """A `prompt` field: a string (one user turn) or messages ending with the user turn to answer."""
    if isinstance(value, str):
        if not value.strip():
            raise InputError(path, "empty prompt", line=line, field="prompt")
        return [Message(role="user", content=value.strip())]
    msgs = _messages(value, path, line, "prompt")
    if msgs[-1].role != "user":
        raise InputError(path, "the prompt must end with a user turn", line=line, field="prompt")
    return msgs


def _response(value: Any, path: str, line: int, field: str) -> tuple[list[Message], str]:
    """A response field: a string, or messages whose last turn is the assistant's (earlier turns are context)."""
    if isinstance(value, str):
        return [], value.strip()
    msgs = _messages(value, path, line, field)
    if msgs[-1].role != "assistant":
        raise InputError(path, "the last message must be the assistant's", line=line, field=field)
    return msgs[:-1], msgs[-1].content.strip()


def _split_transcript(text: str, path: str, line: int, field: str) -> tuple[list[Message], str]:
    try:
        context, last = split_prompt_response(parse_hh(text))
    except TranscriptError as e:
        raise InputError(path, f"malformed HH transcript: {e}", line=line, field=field) from None
    return context, last.content


def _shared_context(
    chosen: tuple[list[Message], str], rejected: tuple[list[Message], str], path: str, line: int
) -> list[Message]:
    if chosen[0] != rejected[0]:
        turn = next(
            (i + 1 for i, (a, b) in enumerate(zip(chosen[0], rejected[0])) if a != b),
            min(len(chosen[0]), len(rejected[0])) + 1,
        )
        raise InputError(
            path, f"chosen and rejected do not share their context (they first differ at turn {turn}); "
            "only the last assistant turn may differ", line=line,
        )
    return chosen[0]


def human_pair_from_row(row: dict[str, Any], path: str, line: int) -> HumanPair:
    """One human comparison from a row in any of the accepted forms:

    - HH-RLHF: `chosen` and `rejected` full transcripts that differ only in the last assistant turn;
    - `prompt` (string or messages) with `chosen`/`rejected` as strings or assistant message lists;
    - `chosen`/`rejected` as whole conversations (implicit prompt: the shared turns before the last).
    An optional `label_prob` gives the probability that chosen is better (default 1.0).
    """
    for field in ("chosen", "rejected"):
        if field not in row:
            raise InputError(path, f"missing '{field}'", line=line, field=field)
    if "prompt" in row:
        context = _context(row["prompt"], path, line)
        chosen, rejected = _response(row["chosen"], path, line, "chosen"), _response(row["rejected"], path, line, "rejected")
        context = context + _shared_context(chosen, rejected, path, line)
    elif isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        chosen = _split_transcript(row["chosen"], path, line, "chosen")
        rejected = _split_transcript(row["rejected"], path, line, "rejected")
        context = _shared_context(chosen, rejected, path, line)
    else:
        chosen, rejected = _response(row["chosen"], path, line, "chosen"), _response(row["rejected"], path, line, "rejected")
        context = _shared_context(chosen, rejected, path, line)
        if not context or context[-1].role != "user":
            raise InputError(path, "no user turn before the responses (give a 'prompt')", line=line)
    label_prob = row.get("label_prob", 1.0)
    if not isinstance(label_prob, (int, float)) or not 0.0 <= label_prob <= 1.0:
        raise InputError(path, f"must be a number in [0, 1], got {label_prob!r}", line=line, field="label_prob")
    return HumanPair(prompt=context, chosen=chosen[1], rejected=rejected[1], label_prob=float(label_prob), line=line)


def read_human_pairs(
    path: str | Path, limit: int | None = None, skip_malformed: bool = False
) -> tuple[list[HumanPair], list[InputError]]:
    """Human comparisons of a file, the first `limit` good ones. With `skip_malformed`, bad rows are
    returned as errors instead of stopping the read (public HH data has a few broken transcripts)."""
    pairs: list[HumanPair] = []
    skipped: list[InputError] = []
    for line, row in iter_rows(path):
        if limit is not None and len(pairs) >= limit:
            break
        try:
            pairs.append(human_pair_from_row(row, str(path), line))
        except InputError as e:
            if not skip_malformed:
                raise
            skipped.append(e)
    if not pairs:
        raise InputError(str(path), "no usable pairs in file")
    return pairs, skipped


def read_label_pairs(path: str | Path, limit: int | None = None) -> list[Pair]:
    """Pairs to label: `prompt` with `response_a`/`response_b` (strings or assistant message lists),
    or any human-pair form (chosen goes to slot A; both orders are scored anyway)."""
    out: list[Pair] = []
    for line, row in iter_rows(path):
        if limit is not None and len(out) >= limit:
            break
        p = str(path)
        if "response_a" in row or "response_b" in row:
            if "prompt" not in row:
                raise InputError(p, "missing 'prompt'", line=line, field="prompt")
            context = _context(row["prompt"], p, line)
            for field in ("response_a", "response_b"):
                if field not in row:
                    raise InputError(p, f"missing '{field}'", line=line, field=field)
            a, b = _response(row["response_a"], p, line, "response_a"), _response(row["response_b"], p, line, "response_b")
            context = context + _shared_context(a, b, p, line)
            out.append(Pair(prompt=context, response_a=a[1], response_b=b[1], source_index=line,
                            source_id=row.get("id") if isinstance(row.get("id"), str) else None))
        elif "chosen" in row:
            h = human_pair_from_row(row, p, line)
            out.append(Pair(prompt=h.prompt, response_a=h.chosen, response_b=h.rejected, source_index=line,
                            source_id=row.get("id") if isinstance(row.get("id"), str) else None))
        else:
            raise InputError(p, "expected prompt/response_a/response_b or prompt/chosen/rejected", line=line)
    if not out:
        raise InputError(str(path), "no pairs in file")
    return out


def read_critique_pairs(path: str | Path, limit: int | None = None) -> list[Pair]:
    """Critique-revise rows (`cai generate` output) as pairs: A = initial response, B = final revision."""
    out: list[Pair] = []
    p = str(path)
    for line, row in iter_rows(path):
        if limit is not None and len(out) >= limit:
            break
        for field in ("prompt", "initial_response", "final_response"):
            if field not in row:
                raise InputError(p, f"missing '{field}' (is this a `cai generate` output?)", line=line, field=field)
        out.append(Pair(
            prompt=_context(row["prompt"], p, line),
            response_a=_response(row["initial_response"], p, line, "initial_response")[1],
            response_b=_response(row["final_response"], p, line, "final_response")[1],
            source_index=line,
            source_id=row.get("id") if isinstance(row.get("id"), str) else None,
        ))
    if not out:
        raise InputError(p, "no rows in file")
    return out


def sample_index_pairs(samples: int) -> list[tuple[int, int]]:
    """Which samples of one prompt get compared: every unordered pair (2 samples -> 1 pair, 4 -> 6)."""
    return list(itertools.combinations(range(samples), 2))


def sample_responses(
    engine: Engine, conversations: list[list[Message]], samples: int, sampling: SamplingConfig, seeds: list[int]
) -> list[list[str]]:
    """`samples` responses per conversation in one generate call; response s of row i uses seeds[i] + s,
    so the text depends only on the row, not on its batch."""
    prompts = [engine.render_chat(as_dicts(c)) for c in conversations for _ in range(samples)]
    row_seeds = [seed + s for seed in seeds for s in range(samples)]
    gens = engine.generate(prompts, sampling, seeds=row_seeds)
    texts = [g.text.strip() for g in gens]
    return [texts[i * samples : (i + 1) * samples] for i in range(len(conversations))]


def row_seed(run_seed: int, *parts: Any) -> int:
    """A 32-bit seed derived from the run seed and a row's content (stable across batches and shards)."""
    return int(sha256_of([run_seed, *parts])[:8], 16)
