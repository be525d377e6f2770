"""Stable content hashes: record ids and config fingerprints.

Text is hashed as UTF-8. A lone UTF-16 surrogate (JSON "\\ud83d") has no UTF-8 form; the readers
refuse it with the file and line (cai.textio), and anything that still reaches a hash is refused
here with a plain error rather than hashed some other way, so an id never depends on how it
was read.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cai.errors import CaiError


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal content always hashes equal."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_of(obj: Any) -> str:
    data = obj if isinstance(obj, (bytes, str)) else canonical_json(obj)
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError as e:
            raise CaiError(
                f"cannot hash text holding a lone UTF-16 surrogate (\\u{ord(e.object[e.start]):04x}) near "
                f"{e.object[max(0, e.start - 30):e.start]!r}; write the full surrogate pair or the character "
                "itself in the input file"
            ) from None
    return hashlib.sha256(data).hexdigest()


def record_id(*parts: Any, length: int = 16) -> str:
    """Id of a row: a hash of its input and the stage config that produced it."""
    return sha256_of(list(parts))[:length]
