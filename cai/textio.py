"""Reading text we did not write: UTF-8 only, and a bad byte or a lone surrogate names its file and line.

Python's own decoding error names neither the file nor the line, and a JSON string such as
"\\ud83d" decodes to a lone UTF-16 surrogate that no UTF-8 writer (nor our content hash) can encode,
so it would fail far from the file it came from. Every reader of user files goes through here, and
the rule is the same everywhere: such text is refused with the file and line, never repaired.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cai.errors import InputError

_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # cheap pre-check on raw JSON


def _bad_bytes(path: str | Path, err: UnicodeDecodeError, data: bytes, line: int) -> InputError:
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    byte = data[err.start:err.start + 1].hex()
    return InputError(str(path), f"not valid UTF-8 text (byte 0x{byte} at column {column}); "
                      "save the file as UTF-8", line=line)


def decode_line(raw: bytes, path: str | Path, line: int) -> str:
    """One line of a file as text; a byte that is not UTF-8 is an InputError naming the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad_bytes(path, e, raw, line) from None


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a text file, or of a gzipped one (`.gz`); a bad byte, or a
    .gz that is not gzip or is cut short, is an InputError naming the file (and line)."""
    p = Path(path)
    line = 0
    try:
        with gzip.open(p, "rb") if p.suffix == ".gz" else p.open("rb") as f:
            for line, raw in enumerate(f, start=1):
                yield line, decode_line(raw, p, line)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        where = f"after line {line}: " if line else ""
        raise InputError(str(p), f"{where}not a readable gzip file ({e}); recompress it, or drop the .gz "
                         "suffix if it is plain text") from None


def read_text(path: str | Path) -> str:
    """A whole file as UTF-8 text (a BOM is dropped); a bad byte names its line and column."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _bad_bytes(path, e, data, data.count(b"\n", 0, e.start) + 1) from None


def check_utf8(path: str | Path) -> None:
    """Stream a text file once and raise for its first line that is not UTF-8 (for files a library
    parses itself, whose own error would name neither the file nor the line)."""
    for _ in iter_lines(path):
        pass


def lone_surrogate(value: Any) -> str | None:
    """The first string inside `value` (nested lists/dicts, keys too) holding a lone surrogate."""
    if isinstance(value, str):
        return value if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        items: list[Any] = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return None
    for item in items:
        found = lone_surrogate(item)
        if found is not None:
            return found
    return None


def surrogate_error(path: str | Path, line: int | None, text: str) -> InputError:
    code = f"\\u{ord(_SURROGATE.search(text).group()):04x}"  # type: ignore[union-attr]
    return InputError(str(path), f"text holds a lone UTF-16 surrogate ({code}) that is not a character; "
                      "write the full surrogate pair or the character itself", line=line)


def parse_json_line(text: str, path: str | Path, line: int) -> Any:
    """json.loads of one JSONL line; bad JSON and lone surrogates name the line."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(str(path), f"not valid JSON ({e.msg})", line=line) from None
    if _ESCAPED_SURROGATE.search(text) and (bad := lone_surrogate(obj)) is not None:
        raise surrogate_error(path, line, bad)
    return obj


def read_json(path: str | Path) -> Any:
    """A whole JSON file (a sidecar, a run log) with the same rules as `parse_json_line`."""
    text = read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(str(path), f"not valid JSON ({e.msg})", line=e.lineno) from None
    if _ESCAPED_SURROGATE.search(text) and (bad := lone_surrogate(obj)) is not None:
        raise surrogate_error(path, None, bad)
    return obj
