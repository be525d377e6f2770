"""Supervised fine-tuning on critique-revise output: the SL-CAI step.

Each row is a conversation that ends with the (revised) assistant response. Only that final
response is trained on: earlier assistant turns in red-team dialogues are the original, possibly
harmful, model replies, which is exactly what SL-CAI must not imitate. The prompt is rendered the
way generation renders it (the tokenizer's chat template, else the HH transcript format), and
the prompt and the response are tokenized separately, so the model learns the token boundary it
will actually see when it continues a prompt at sampling time.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from cai.conversation import Message, to_hh
from cai.errors import CaiError, InputError

IGNORE = -100  # label of tokens that carry no loss


# ---------------------------------------------------------------- chat format (shared with PPO)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text a model continues to answer as the assistant after `messages`."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return to_hh(messages, assistant_prefix="")


def render_completion(tokenizer: Any, messages: list[dict[str, str]], response: str) -> str:
    """The text that follows `render_prompt(messages)` when the assistant says `response`."""
    if not has_chat_template(tokenizer):
        return " " + response.strip()
    prefix = render_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=False
    )
    if not full.startswith(prefix):
        raise CaiError(
            "the tokenizer's chat template renders the conversation differently with and without the "
            "final assistant turn, so the response tokens cannot be isolated; use a model whose template "
            "only appends the assistant turn"
        )
    return full[len(prefix):]


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt; BOS is added unless the rendered text already starts with it."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


# ---------------------------------------------------------------- rows -> examples


class SFTExample(BaseModel):
    """A conversation to condition on and the assistant response to learn."""

    model_config = ConfigDict(extra="forbid")

    prompt: list[Message]
    response: str


def _messages(value: Any, path: str, line: int, field: str) -> list[Message]:
    if isinstance(value, str):
        return [Message(role="user", content=value)]
    if not isinstance(value, list):
        raise InputError(path, "expected a string or a list of messages", line=line, field=field)
    try:
        return [Message.model_validate(m) for m in value]
    except ValidationError as e:
        raise InputError(path, f"bad message: {e.errors()[0]['msg']}", line=line, field=field) from None


def row_to_example(row: dict[str, Any], path: str, line: int) -> SFTExample:
    """Accepts the exported `messages` form, `prompt`/`completion`, and raw critique-stage rows
    (`prompt` + `final_response`)."""
    if "messages" in row:
        msgs = _messages(row["messages"], path, line, "messages")
        if not msgs or msgs[-1].role != "assistant":
            raise InputError(path, "the conversation must end with an assistant message", line=line, field="messages")
        prompt, response = msgs[:-1], msgs[-1].content
    elif "prompt" in row and ("completion" in row or "final_response" in row):
        prompt = _messages(row["prompt"], path, line, "prompt")
        if "final_response" in row:
            response = row["final_response"]
        elif isinstance(row["completion"], str):
            response = row["completion"]
        else:
            completion = _messages(row["completion"], path, line, "completion")
            if len(completion) != 1 or completion[0].role != "assistant":
                raise InputError(path, "expected one assistant message", line=line, field="completion")
            response = completion[0].content
    else:
        raise InputError(
            path, "expected `messages`, `prompt` + `completion`, or `prompt` + `final_response`", line=line
        )
    if not any(m.role == "user" for m in prompt):
        raise InputError(path, "the prompt has no user message", line=line)
    if not isinstance(response, str):
        raise InputError(path, "the response must be a string", line=line)
    return SFTExample(prompt=prompt, response=response)


def _iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(str(path), f"not valid JSON ({e.msg})", line=lineno) from None
            if not isinstance(obj, dict):
                raise InputError(str(path), "expected a JSON object", line=lineno)
            yield lineno, obj


def load_examples(path: str | Path) -> tuple[list[SFTExample], int]:
    """All examples of a JSONL (.gz) or parquet file, and how many rows were skipped for an empty response."""
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), "file not found")
    examples, empty = [], 0
    for line, row in _iter_rows(p):
        ex = row_to_example(row, str(p), line)
        if ex.response.strip():
            examples.append(ex)
        else:
            empty += 1
    if not examples:
        raise InputError(str(p), "no training examples in file")
    return examples, empty


# ---------------------------------------------------------------- tokenization, packing, collation


class Tokenized(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt, the token id on the response (and its EOS)


def tokenize_example(tokenizer: Any, example: SFTExample, max_length: int) -> Tokenized | None:
    """Prompt ids (no loss) + response ids + EOS (loss); cut on the right at max_length.

    Returns None when the prompt alone leaves no room for a response token.
    """
    messages = [m.model_dump() for m in example.prompt]
    prompt_ids = encode_prompt(tokenizer, render_prompt(tokenizer, messages))
    completion = render_completion(tokenizer, messages, example.response)
    response_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if not response_ids or response_ids[-1] != eos:
        response_ids.append(eos)
    if len(prompt_ids) >= max_length:
        return None
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    return Tokenized(input_ids=ids, labels=labels)


def pack(examples: list[Tokenized], max_length: int) -> list[list[Tokenized]]:
    """Greedily fill rows of at most max_length tokens, in order; each example stays whole."""
    rows: list[list[Tokenized]] = []
    used = max_length + 1
    for ex in examples:
        n = len(ex.input_ids)
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += n
    return rows


def collate(rows: list[list[Tokenized]], pad_id: int) -> dict[str, torch.Tensor | None]:
    """A right-padded batch. Rows holding several packed examples get position ids that restart at
    each example and no attention mask: transformers then builds a block-diagonal causal mask from
    the position ids, so packed examples never attend to each other."""
    packed = any(len(r) > 1 for r in rows)
    width = max(sum(len(ex.input_ids) for ex in r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        start = 0
        for ex in r:
            n = len(ex.input_ids)
            ids[i, start:start + n] = torch.tensor(ex.input_ids)
            labels[i, start:start + n] = torch.tensor(ex.labels)
            attention[i, start:start + n] = 1
            positions[i, start:start + n] = torch.arange(n)
            start += n
        positions[i, start:] = torch.arange(width - start)  # padding: a separate dummy sequence
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": None if packed else attention,
        "position_ids": positions,
    }


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the labelled (response) tokens of the batch, and their count."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    n = int((shift_labels != IGNORE).sum())
    total = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return total / max(n, 1), n
