"""Read prompts for the generation stages from JSONL, HH transcripts or any `datasets`-loadable file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cai.conversation import Message, TranscriptError, parse_hh
from cai.errors import CaiError, InputError
from cai.store import iter_jsonl
from cai.textio import check_utf8


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise CaiError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise CaiError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def shard_spec(spec: str | None) -> str:
    """The canonical 'i/n' of a --shard value ('0/1' for none)."""
    return "{}/{}".format(*parse_shard(spec))


def _iter_dataset_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets
    from datasets.exceptions import DatasetGenerationError

    if path.suffix in (".json", ".csv"):
        check_utf8(path)  # the datasets loaders' own error names neither file nor line
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        else:
            kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
            if kind is None:
                raise InputError(str(path), "unsupported file type (use .jsonl, .jsonl.gz, .json, .parquet, .csv or a saved dataset dir)")
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except (FileNotFoundError, ValueError, DatasetGenerationError) as e:
        cause = e.__cause__ if isinstance(e, DatasetGenerationError) and e.__cause__ else e
        why = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise InputError(str(path), f"cannot load as a dataset: {why}") from None
    for i, row in enumerate(ds, start=1):
        yield i, dict(row)


def row_to_conversation(row: dict[str, Any], path: str, line: int) -> list[Message]:
    """A prompt row -> the conversation to answer (ends with a user turn).

    Accepts `prompt` (a string, or a list of messages), `messages` (the last assistant turn, if any,
    is dropped), or an HH transcript in `chosen`/`transcript` (its first human turn).
    """
    try:
        if isinstance(row.get("prompt"), str):
            if not row["prompt"].strip():
                raise InputError(path, "empty prompt", line=line, field="prompt")
            return [Message(role="user", content=row["prompt"].strip())]
        msgs = row.get("prompt") if isinstance(row.get("prompt"), list) else row.get("messages")
        if isinstance(msgs, list):
            conv = [Message.model_validate(m) for m in msgs]
            while conv and conv[-1].role == "assistant":
                conv.pop()
            if not conv or conv[-1].role != "user":
                raise InputError(path, "messages have no user turn to answer", line=line, field="messages")
            return conv
        transcript = row.get("transcript", row.get("chosen"))
        if isinstance(transcript, str):
            first = parse_hh(transcript)[0]
            return [first]
    except TranscriptError as e:
        raise InputError(path, f"malformed HH transcript: {e}", line=line) from None
    except ValueError as e:  # pydantic validation of messages
        raise InputError(path, f"bad message list: {str(e).splitlines()[0]}", line=line, field="messages") from None
    raise InputError(
        path, "no prompt found: expected a 'prompt' string, a 'messages' list or an HH 'chosen' transcript", line=line
    )


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, row) of a .jsonl / .jsonl.gz file, or (row number, row) of any datasets-loadable file."""
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), "file not found")
    if p.name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return iter_jsonl(p)
    return _iter_dataset_rows(p)


def load_prompts(path: str | Path, limit: int | None = None) -> list[list[Message]]:
    """All prompts of a file as conversations, in file order, the first `limit` of them if given."""
    p = Path(path)
    out: list[list[Message]] = []
    for line, row in iter_rows(p):
        if limit is not None and len(out) >= limit:
            break
        out.append(row_to_conversation(row, str(p), line))
    if not out:
        raise InputError(str(p), "no prompts in file")
    return out


def shard_indices(n_items: int, shard: tuple[int, int]) -> list[int]:
    """Indices of the items in shard i of n: every n-th item starting at i (deterministic, balanced)."""
    i, n = shard
    return list(range(i, n_items, n))
