"""Constitutions: named sets of principles, loaded from YAML with errors that name file, line and field.

A principle carries the three requests the pipeline sends to a model: a critique request, a revision
request (critique-revise stage) and a feedback question (AI preference labels). Its texts are sent
verbatim, so they may hold no `{placeholder}`; the prompt templates supply the conversation.
"""

from __future__ import annotations

import difflib
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
)

from cai.errors import CaiError, InputError
from cai.hashing import sha256_of
from cai.yamlio import Loc, LocatedYaml, load_yaml

SLUG = r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$"
PRINCIPLE_TEXTS = ("critique", "revision", "feedback")


def _no_placeholders(text: str) -> str:
    """Reject `{name}` fields and lone braces; `{{` and `}}` stand for literal braces."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError:
        raise ValueError("unbalanced brace; write {{ or }} for a literal brace") from None
    if fields:
        names = ", ".join("{" + f + "}" for f in fields)
        raise ValueError(f"unknown placeholder {names}: principle texts take no placeholders "
                         "(write {{ and }} for literal braces)")
    return text


Slug = Annotated[str, StringConstraints(pattern=SLUG)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
PrincipleText = Annotated[Text, AfterValidator(_no_placeholders)]


class Principle(BaseModel):
    """One rule of the constitution, phrased three ways for the three places a model reads it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Slug = Field(description="stable key recorded in every row this principle shaped")
    critique: PrincipleText = Field(description="asks the model to find what is wrong with a response")
    revision: PrincipleText = Field(description="asks the model to rewrite the response to fix it")
    feedback: PrincipleText = Field(description="multiple-choice question comparing two responses")
    tags: list[Slug] = Field(default_factory=list, description="for selecting a subset (--tag)")
    weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="relative chance of being drawn")


class Constitution(BaseModel):
    """A versioned set of principles plus the few-shot file its critique prompts start from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Text
    version: Text
    description: Text
    few_shot: Text = Field(description="few-shot prompt YAML, relative to the constitution file")
    principles: list[Principle] = Field(min_length=1)

    _source_path: Path | None = PrivateAttr(None)

    @property
    def sha256(self) -> str:
        """Hash of the content (not the file bytes), so reformatting or reordering keys keeps it."""
        return sha256_of(self.model_dump(mode="json"))

    @property
    def source_path(self) -> Path | None:
        return self._source_path

    @property
    def few_shot_path(self) -> Path:
        base = self._source_path.parent if self._source_path else Path.cwd()
        return (base / self.few_shot).resolve()

    @property
    def tags(self) -> list[str]:
        return sorted({t for p in self.principles for t in p.tags})

    def principle(self, id: str) -> Principle:
        for p in self.principles:
            if p.id == id:
                return p
        ids = ", ".join(p.id for p in self.principles)
        raise CaiError(f"constitution {self.name!r} has no principle {id!r}; its principles are: {ids}")

    def select(self, tags: list[str] | None = None) -> list[Principle]:
        """Principles with any of `tags` (all when tags is empty). A tag no principle has is an error,
        so a typo on the command line cannot silently shrink the set."""
        if not tags:
            return list(self.principles)
        unknown = sorted(set(tags) - set(self.tags))
        if unknown:
            raise CaiError(f"constitution {self.name!r} has no principle tagged {', '.join(unknown)}; "
                           f"its tags are: {', '.join(self.tags)}")
        return [p for p in self.principles if set(p.tags) & set(tags)]

    def to_yaml(self) -> str:
        """The canonical YAML form: loading it gives the same content and the same sha256."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100)


@dataclass(frozen=True)
class Problem:
    """One finding about a constitution file, printed gcc-style: `path:line:field: severity: message`."""

    path: str
    line: int | None
    field: str | None
    severity: Literal["error", "warning"]
    code: str
    message: str

    def __str__(self) -> str:
        where = self.path + (f":{self.line}" if self.line else "")
        where += f":{self.field}" if self.field else ""
        return f"{where}: {self.severity}: {self.message} [{self.code}]"

    def as_error(self) -> InputError:
        return InputError(self.path, self.message, line=self.line, field=self.field)


class CheckResult(NamedTuple):
    """What checking a file found: the constitution (None if it has errors), its errors, the YAML."""

    constitution: Constitution | None
    problems: list[Problem]
    doc: LocatedYaml | None


def field_name(loc: Loc) -> str | None:
    """('principles', 3, 'revision') -> 'principles[3].revision'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _problem(doc: LocatedYaml, loc: Loc, code: str, message: str) -> Problem:
    return Problem(str(doc.path), doc.line_of(loc), field_name(loc), "error", code, message)


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _describe(err: dict[str, Any], data: dict[str, Any]) -> tuple[Loc, str, str]:
    """(loc, code, message) for one pydantic error, worded for someone editing the YAML."""
    loc, kind, value = tuple(err["loc"]), err["type"], err.get("input")
    key = loc[-1] if loc else None
    blank = kind == "missing" or (kind in ("string_type", "string_too_short", "list_type", "too_short")
                                  and (_is_blank(value) or value == []))
    if blank and len(loc) == 3 and loc[0] == "principles" and key in ("critique", "revision"):
        other = "revision" if key == "critique" else "critique"
        item = data["principles"][loc[1]]
        if not _is_blank(item.get(other)):
            state = "missing" if kind == "missing" else "empty"
            return loc, "unpaired", f"{other} has no matching {key} ({key} is {state})"
    if kind == "missing":
        return loc, "missing-field", "required field is missing"
    if blank:
        if loc == ("principles",):
            return loc, "no-principles", "the constitution has no principles"
        return loc, "empty-field", "must not be empty"
    if kind == "extra_forbidden":
        fields = Principle.model_fields if len(loc) == 3 else Constitution.model_fields
        close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; allowed keys: {', '.join(fields)}"
        return loc, "unknown-key", f"unknown key {key!r}{hint}"
    if kind == "string_pattern_mismatch":
        return loc, "bad-slug", f"{value!r} must be a lowercase slug (letters, digits, '-' or '_')"
    if kind == "value_error":
        return loc, "placeholder", str(err["ctx"]["error"])
    if kind in ("greater_than", "finite_number", "float_parsing", "float_type") and key == "weight":
        return loc, "bad-weight", f"weight must be a finite number greater than 0, got {value!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        fields = Principle.model_fields if loc and loc[0] == "principles" else Constitution.model_fields
        return loc, "bad-type", f"expected a mapping with keys {', '.join(fields)}, got {value!r}"
    if kind == "string_type" and key == "version":
        return loc, "bad-type", f"must be text, got {value!r}; quote it: version: \"{value}\""
    return loc, "bad-type", err["msg"][0].lower() + err["msg"][1:] + f", got {value!r}"


def _duplicate_ids(doc: LocatedYaml, principles: Any) -> list[Problem]:
    if not isinstance(principles, list):
        return []
    first: dict[str, int] = {}
    out = []
    for i, item in enumerate(principles):
        pid = item.get("id") if isinstance(item, dict) else None
        if not isinstance(pid, str):
            continue
        if pid in first:
            line = doc.line_of(("principles", first[pid], "id"))
            out.append(_problem(doc, ("principles", i, "id"), "duplicate-id",
                                f"duplicate principle id {pid!r} (first used on line {line})"))
        else:
            first[pid] = i
    return out


def check_constitution(path: str | Path) -> CheckResult:
    """Every error in a constitution file, sorted by line (malformed YAML stops at the first)."""
    if Path(path).is_dir():
        return CheckResult(None, [Problem(str(path), None, None, "error", "not-a-file",
                                          "is a directory; give the path of a constitution YAML file")], None)
    if not Path(path).is_file():
        return CheckResult(None, [Problem(str(path), None, None, "error", "not-found", "file not found")], None)
    try:
        doc = load_yaml(path)
    except InputError as e:
        return CheckResult(None, [Problem(e.path, e.line, e.field, "error", "yaml", e.detail)], None)
    if not isinstance(doc.data, dict):
        what = "the file is empty" if doc.data is None else "the top level is not a mapping"
        message = f"{what}; expected keys {', '.join(Constitution.model_fields)}"
        return CheckResult(None, [_problem(doc, (), "not-a-mapping", message)], doc)
    problems = _duplicate_ids(doc, doc.data.get("principles"))
    try:
        constitution = Constitution.model_validate(doc.data)
    except ValidationError as err:
        constitution = None
        problems += [_problem(doc, *_describe(e, doc.data)) for e in err.errors()]
    if problems:
        return CheckResult(None, sorted(problems, key=lambda p: p.line or 0), doc)
    constitution._source_path = doc.path
    return CheckResult(constitution, [], doc)


def load_constitution(path: str | Path) -> Constitution:
    """Load and validate a constitution; the first problem (by line) raises an InputError with its line."""
    result = check_constitution(path)
    if result.problems:
        raise result.problems[0].as_error()
    assert result.constitution is not None
    return result.constitution
