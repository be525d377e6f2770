"""Dropping flagged rows on the way into a dataset, by a rule the user lists (`--drop-flag NAME`).

The rule: a row is dropped when any flag named in the list is set on it. A row's flags are its
`flags` field: a mapping of flag name -> bool (critique-revise rows, `cai.records.Flags`) or a
list of the names that are set. Rows without a `flags` field carry no flags and are kept. Only
the names `Flags` defines are accepted (argparse choices, config validators), so a typo cannot
silently filter nothing.

A row the engine refused even on its own (`error` set: `flags.error` on critique-revise rows, the
top-level `error` of label rows) has no responses to train on, so it is always dropped, counted as
`flag:error`, whatever the list says.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from cai.records import Flags

FLAG_NAMES = tuple(Flags.model_fields)


ALWAYS_DROPPED = ("error",)


def row_flags(row: dict[str, Any]) -> set[str]:
    """Names of the flags set on a raw row (see the module docstring for the accepted forms)."""
    flags = row.get("flags")
    names: set[str] = set()
    if isinstance(flags, dict):
        names = {str(k) for k, v in flags.items() if v}  # bools, and `error`'s message
    elif isinstance(flags, list):
        names = {str(k) for k in flags}
    if row.get("error"):
        names.add("error")
    return names


def drop_reason(flags: set[str], drop: tuple[str, ...]) -> str | None:
    """The first flag of ALWAYS_DROPPED + `drop` set in `flags` (what the row is counted under), or
    None to keep it."""
    return next((name for name in ALWAYS_DROPPED + tuple(drop) if name in flags), None)


def count_key(flag: str) -> str:
    """How dropped rows are counted in summaries: `flag:<name>`."""
    return f"flag:{flag}"


def tally(reasons: Iterable[str | None]) -> dict[str, int]:
    """Counts of dropped rows per flag, for a summary."""
    return {count_key(r): n for r, n in sorted(Counter(r for r in reasons if r is not None).items())}
