"""`cai constitution validate|lint|show`: check constitution files before a long run, or look inside one."""

from __future__ import annotations

import argparse
import textwrap
from collections import Counter
from pathlib import Path

from cai.constitution import Constitution, Problem, load_constitution
from cai.lint import WARNINGS, lint_constitution

GROUP = None

WIDTH = 100  # fixed, so output is the same in a terminal, a pipe and a CI log


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("constitution", help="validate, lint or show constitution YAML files",
                       description="Check constitution files or print a summary of one.")
    p.set_defaults(func=lambda _: p.print_help() or 2)
    cmds = p.add_subparsers(dest="constitution_command", metavar="ACTION")
    fmt = argparse.RawDescriptionHelpFormatter

    v = cmds.add_parser(
        "validate", help="report errors (exit 0 ok, 2 errors)", formatter_class=fmt,
        description="Report every error in each file as PATH:LINE:FIELD: error: MESSAGE [CODE].\n\n"
        "errors: malformed YAML, missing/empty fields, unknown keys, duplicate principle ids, a critique\n"
        "without a revision (or the reverse), {placeholders} in principle texts, weights <= 0, no principles,\n"
        "a few_shot file that does not exist or lies outside the constitution's folder (the bundled prompts/\n"
        "and any --few-shot-dir are allowed too).\n\n"
        "exit status: 0 every file is valid; 2 at least one error.",
    )
    v.add_argument("paths", nargs="+", metavar="PATH")
    _add_few_shot_dir(v)
    v.set_defaults(func=run_validate)

    codes = "\n".join(f"  {code:22} {what}" for code, what in WARNINGS.items())
    lint = cmds.add_parser(
        "lint", help="report errors and warnings (exit 0 clean, 1 warnings, 2 errors)", formatter_class=fmt,
        description="Report errors (as `validate`) and, for valid files, warnings:\n" + codes + "\n\n"
        "exit status: 0 clean; 1 warnings but no errors; 2 at least one error\n"
        "(with --strict, warnings count as errors: exit 2).",
    )
    lint.add_argument("paths", nargs="+", metavar="PATH")
    _add_few_shot_dir(lint)
    lint.add_argument("--strict", action="store_true", help="treat warnings as errors (exit 2)")
    lint.add_argument("--ignore", action="append", default=[], choices=sorted(WARNINGS), metavar="CODE",
                      help="skip this warning (repeatable)")
    lint.set_defaults(func=run_lint)

    show = cmds.add_parser("show", help="print a constitution's principles as a table (exit 1 if invalid)")
    show.add_argument("path", metavar="PATH")
    show.add_argument("--yaml", action="store_true", help="print the canonical YAML instead of a table")
    show.add_argument("--metrics", metavar="METRICS_JSON",
                      help="a `cai label eval` metrics.json: add each principle's agreement with the human labels "
                      "(95%% interval, pairs) and position-bias rate to the table")
    show.set_defaults(func=run_show)


def _add_few_shot_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--few-shot-dir", dest="few_shot_dirs", action="append", default=[], type=Path, metavar="DIR",
                   help="a shared prompt folder few_shot files may point into, besides the constitution's own "
                   "folder and the bundled prompts/ (repeatable)")


def _report(problems_by_path: dict[str, list[Problem]]) -> Counter[str]:
    """Print each problem gcc-style, an ok line per clean file, then totals; return counts by severity."""
    totals: Counter[str] = Counter()
    for path, problems in problems_by_path.items():
        for problem in problems:
            print(problem)
        if not problems:
            print(f"{path}: ok")
        totals.update(p.severity for p in problems)
    files = len(problems_by_path)
    print(f"{totals['error']} error(s), {totals['warning']} warning(s) in {files} file(s)")
    return totals


def run_validate(args: argparse.Namespace) -> int:
    shared = tuple(args.few_shot_dirs)
    found = {path: [p for p in lint_constitution(path, shared_dirs=shared) if p.severity == "error"]
             for path in args.paths}
    return 2 if _report(found)["error"] else 0


def run_lint(args: argparse.Namespace) -> int:
    found = {path: lint_constitution(path, ignore=frozenset(args.ignore), shared_dirs=tuple(args.few_shot_dirs))
             for path in args.paths}
    totals = _report(found)
    if totals["error"] or (args.strict and totals["warning"]):
        return 2
    return 1 if totals["warning"] else 0


def _table(c: Constitution, extra: tuple[list[str], dict[str, list[str]]] | None = None) -> list[str]:
    """One row per principle; `extra` = (column heads, cells by principle id) goes before the critique."""
    total = sum(p.weight for p in c.principles)
    more_head, more = extra or ([], {})
    blank = ["-"] * len(more_head)
    rows = [(p.id, f"{p.weight:g}", f"{p.weight / total:.0%}", ",".join(p.tags), *more.get(p.id, blank),
             " ".join(p.critique.split())) for p in c.principles]
    head = ("id", "weight", "share", "tags", *more_head, "critique")
    fixed = len(head) - 1
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(fixed)]
    room = max(WIDTH - sum(widths) - 2 * fixed, 20)
    return ["  ".join(cell.ljust(w) for cell, w in zip(r[:fixed], widths)) + "  "
            + textwrap.shorten(r[fixed], room, placeholder="...") for r in [head, *rows]]


def _metric_columns(path: str) -> tuple[list[str], dict[str, list[str]]]:
    """Per-principle agreement columns from a `cai label eval` metrics.json."""
    from pydantic import ValidationError

    from cai.errors import CaiError
    from cai.stages.label_eval import EvalSummary

    try:
        summary = EvalSummary.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise CaiError(f"--metrics {path}: cannot read it ({e.strerror})") from None
    except ValidationError as e:
        raise CaiError(f"--metrics {path}: not a `cai label eval` metrics.json ({e.errors()[0]['msg']})") from None
    cells = {}
    for p in summary.metrics.per_principle:
        a = p.agreement
        cells[p.principle_id] = [f"{a.rate:.2f}", f"{a.low:.2f}-{a.high:.2f}", str(a.n), f"{p.position_bias_rate:.2f}"]
    return ["agree", "95% CI", "pairs", "pos-bias"], cells


def run_show(args: argparse.Namespace) -> int:
    c = load_constitution(args.path)
    if args.yaml:
        print(c.to_yaml(), end="")
        return 0
    missing = "" if c.few_shot_path.is_file() else "  (missing)"
    description = textwrap.fill(c.description, WIDTH, initial_indent=" " * 13, subsequent_indent=" " * 13)
    print(f"name:        {c.name}\nversion:     {c.version}\ndescription: {description.lstrip()}\n"
          f"sha256:      {c.sha256}\nfew-shot:    {c.few_shot_path}{missing}\n"
          f"principles:  {len(c.principles)}  tags: {', '.join(c.tags) or '-'}\n")
    extra = _metric_columns(args.metrics) if args.metrics else None
    print("\n".join(_table(c, extra)))
    if extra is not None:
        print(f"\nagree: share of human-labelled pairs where the principle alone picks the human's choice (from "
              f"{args.metrics}); pos-bias: share of its judgements that flip when the answers swap slots; '-': not judged.")
    return 0
