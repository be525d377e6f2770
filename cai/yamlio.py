"""Safe YAML loading that remembers the line of every key, so errors can name file:line:field.

Anchors and aliases (`&a` / `*a`) are refused where they are parsed: a few lines of aliases can
expand to gigabytes ("billion laughs"), and none of our files needs them. Text must be UTF-8
without lone surrogates (see cai.textio).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cai.errors import InputError
from cai.textio import lone_surrogate, read_text, surrogate_error

Loc = tuple[str | int, ...]


class LocatedYaml:
    """Parsed YAML data plus the 1-based line where each mapping key / sequence item starts."""

    def __init__(self, path: Path, data: Any, lines: dict[Loc, int]):
        self.path = path
        self.data = data
        self.lines = lines

    def line_of(self, loc: Loc) -> int | None:
        """Line of `loc`, or of its nearest ancestor that has one."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get((), None)

    def error(self, loc: Loc, message: str) -> InputError:
        field = ".".join(str(p) for p in loc) or None
        return InputError(str(self.path), message, line=self.line_of(loc), field=field)


class NoAliasLoader(yaml.SafeLoader):
    """The safe loader, refusing any anchor or alias before it is composed into the node graph."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.MarkedYAMLError(
                problem=f"anchors and aliases (&{event.anchor} / *{event.anchor}) are not allowed; "
                "write the value out in full", problem_mark=event.start_mark)
        return super().compose_node(parent, index)  # type: ignore[no-any-return]


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], path: Path) -> Any:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.SafeLoader(  # scalar keys only; construct with the safe constructor
                ""
            ).construct_object(key_node) if not isinstance(key_node, yaml.ScalarNode) else key_node.value
            if isinstance(key, str) and lone_surrogate(key) is not None:
                raise surrogate_error(path, key_node.start_mark.line + 1, key)
            if key in out:
                raise InputError(str(path), f"duplicate key {key!r}", line=key_node.start_mark.line + 1)
            lines[loc + (key,)] = key_node.start_mark.line + 1
            out[key] = _walk(value_node, loc + (key,), lines, path)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, loc + (i,), lines, path) for i, item in enumerate(node.value)]
    value = yaml.SafeLoader("").construct_object(node, deep=True)
    if isinstance(value, str) and lone_surrogate(value) is not None:
        raise surrogate_error(path, node.start_mark.line + 1, value)
    return value


def load_yaml(path: str | Path) -> LocatedYaml:
    """Parse a YAML file with the safe loader; syntax errors become an InputError with the line."""
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), "file not found")
    if p.is_dir():
        raise InputError(str(p), "is a directory; give the path of a YAML file")
    text = read_text(p)
    try:
        node = yaml.compose(text, Loader=NoAliasLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise InputError(str(p), f"invalid YAML: {problem}", line=mark.line + 1 if mark else None) from None
    if node is None:
        return LocatedYaml(p, None, {(): 1})
    lines: dict[Loc, int] = {}
    data = _walk(node, (), lines, p)
    return LocatedYaml(p, data, lines)


def validation_errors(doc: LocatedYaml, err: ValidationError) -> list[InputError]:
    """Turn pydantic errors into InputErrors pointing at the YAML line of each field."""
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required field is missing"
        out.append(doc.error(loc, msg))
    return out


def data_with_overrides(doc: LocatedYaml, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The document's top-level mapping with dotted-key overrides (`a.b=1`) written into it."""
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise InputError(str(doc.path), "expected a mapping at the top level", line=1)
    for key, value in (overrides or {}).items():
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise InputError("<command line>", f"--set {key}: {part} is not a mapping")
        target[parts[-1]] = value
    return data


def load_model(path: str | Path, model: type[BaseModel], overrides: dict[str, Any] | None = None) -> Any:
    """Load a YAML file into a pydantic model, applying dotted-key overrides; errors name the line."""
    doc = load_yaml(path)
    data = data_with_overrides(doc, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = validation_errors(doc, err)
        raise InputError(
            errors[0].path, "; ".join(f"line {x.line}: {x.field}: {x.detail}" for x in errors)
        ) from None


def parse_override(item: str) -> tuple[str, Any]:
    """`key.sub=value` from the command line; the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise InputError("<command line>", f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    if not key.strip() or any(not part.strip() for part in key.split(".")):
        raise InputError("<command line>", f"override {item!r} needs a key (or dotted key such as lr or "
                         "generate.limit) before '='")
    if not raw.strip():
        return key.strip(), ""
    try:
        return key.strip(), yaml.load(raw, Loader=NoAliasLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError("<command line>", f"override {item!r}: the value is not valid YAML ({problem}); "
                         "quote it if it is meant as text") from None
