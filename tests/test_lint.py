"""Constitution linter: warnings with their lines, the shipped constitutions, CLI output and exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai.cli import main
from cai.constitution import load_constitution
from cai.lint import WARNINGS, lint_constitution

DATA = Path(__file__).parent / "data" / "constitutions"
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "constitutions").glob("*.yaml"))

EXPECTED_WARNINGS = [
    (8, "principles[0].revision", "revision-no-rewrite"),
    (12, "principles[1].critique", "critique-no-request"),
    (19, "principles[2].feedback", "feedback-not-question"),
    (24, "principles[3].feedback", "feedback-has-options"),
    (25, "principles[3].tags[0]", "tag-typo"),
    (27, "principles[4].critique", "near-duplicate"),
    (29, "principles[4].feedback", "near-duplicate"),
    (32, "principles[5].critique", "too-long"),
]


def test_every_warning_with_its_line() -> None:
    problems = lint_constitution(DATA / "warnings.yaml")
    assert [(p.line, p.field, p.code) for p in problems] == EXPECTED_WARNINGS
    assert {p.severity for p in problems} == {"warning"}
    assert {p.code for p in problems} == set(WARNINGS)
    messages = {p.line: p.message for p in problems}
    assert messages[25] == "tag 'harn' (used 1x) looks like a typo of 'harm' (used 4x)"
    assert messages[27] == "96% similar to the critique of 'no-rewrite' (line 7)"
    assert messages[32] == "critique is 607 characters; keep it under 600 so prompts fit small models"


def test_ignored_warnings_are_dropped() -> None:
    problems = lint_constitution(DATA / "warnings.yaml", ignore=frozenset({"near-duplicate", "too-long"}))
    assert [p.line for p in problems] == [8, 12, 19, 24, 25]


def test_errors_suppress_warnings_and_a_missing_few_shot_file_is_an_error(tmp_path: Path) -> None:
    assert {p.severity for p in lint_constitution(DATA / "errors.yaml")} == {"error"}
    moved = tmp_path / "warnings.yaml"
    moved.write_text((DATA / "warnings.yaml").read_text())
    problems = lint_constitution(moved)
    assert (problems[0].line, problems[0].field, problems[0].code) == (4, "few_shot", "few-shot-missing")
    assert problems[0].message == f"few-shot file not found: {tmp_path / 'few_shot.yaml'}"
    assert [p.severity for p in problems[1:]] == ["warning"] * len(EXPECTED_WARNINGS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_constitutions_lint_clean(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["constitution", "lint", "--strict", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{path}: ok", "0 error(s), 0 warning(s) in 1 file(s)"]


def test_shipped_constitutions_cover_the_brief() -> None:
    assert [p.name for p in SHIPPED] == ["harmless.yaml", "helpful-honest.yaml"]
    harmless = load_constitution(ROOT / "constitutions" / "harmless.yaml")
    assert len(harmless.principles) >= 12
    ids = {p.id for p in harmless.principles}
    assert {"dangerous-uplift", "discrimination", "privacy", "manipulation", "self-harm-care",
            "honest-uncertainty", "helpful-refusal", "violence", "minors", "expert-advice"} <= ids
    helpful = load_constitution(ROOT / "constitutions" / "helpful-honest.yaml")
    assert 4 <= len(helpful.principles) <= 6
    for c in (harmless, helpful):
        assert c.few_shot_path == ROOT / "prompts" / "critique_revision.yaml"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(["constitution", *argv])
    return code, capsys.readouterr().out.splitlines()


def test_validate_exit_codes_and_output(capsys: pytest.CaptureFixture[str]) -> None:
    valid, errors, warnings = (str(DATA / n) for n in ("valid.yaml", "errors.yaml", "warnings.yaml"))
    assert run(capsys, "validate", valid, warnings) == (
        0, [f"{valid}: ok", f"{warnings}: ok", "0 error(s), 0 warning(s) in 2 file(s)"])
    code, out = run(capsys, "validate", valid, errors)
    assert code == 2
    assert out[0] == f"{valid}: ok"
    assert out[1] == f'{errors}:2:version: error: must be text, got 3; quote it: version: "3" [bad-type]'
    assert out[4] == f"{errors}:9:principles[0].revision: error: critique has no matching revision " \
                     "(revision is empty) [unpaired]"
    assert len(out) == 1 + 13 + 1 and out[-1] == "13 error(s), 0 warning(s) in 2 file(s)"


@pytest.mark.parametrize(("name", "problem"), [("nope.yaml", "file not found [not-found]"),
                                               (".", ("is a directory; give the path of a constitution YAML "
                                                     "file [not-a-file]"))])
def test_validate_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, problem: str) -> None:
    missing = tmp_path / name
    assert run(capsys, "validate", str(missing)) == (
        2, [f"{missing}: error: {problem}", "1 error(s), 0 warning(s) in 1 file(s)"])


def test_lint_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    valid, errors, warnings = (str(DATA / n) for n in ("valid.yaml", "errors.yaml", "warnings.yaml"))
    assert run(capsys, "lint", valid)[0] == 0
    code, out = run(capsys, "lint", warnings)
    assert code == 1
    assert out[0] == f"{warnings}:8:principles[0].revision: warning: revision should ask to rewrite the " \
                     "response (e.g. 'Rewrite ...', 'Revise ...', 'Remove ...') [revision-no-rewrite]"
    assert out[-1] == "0 error(s), 8 warning(s) in 1 file(s)"
    assert run(capsys, "lint", "--strict", warnings)[0] == 2
    assert run(capsys, "lint", warnings, errors)[0] == 2
    ignore = [arg for code in WARNINGS for arg in ("--ignore", code)]
    assert run(capsys, "lint", *ignore, warnings) == (0, [f"{warnings}: ok", "0 error(s), 0 warning(s) in 1 file(s)"])


def test_help_documents_exit_codes_and_bad_flags_fail(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["constitution", "lint", "--help"])
    text = capsys.readouterr().out
    assert "0 clean; 1 warnings but no errors; 2 at least one error" in text
    assert all(code in text for code in WARNINGS)
    with pytest.raises(SystemExit):
        main(["constitution", "validate", "--help"])
    assert "0 every file is valid; 2 at least one error" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["constitution", "lint", "--ignore", "no-such-code", str(DATA / "valid.yaml")])
    assert exc.value.code == 2
    assert main(["constitution"]) == 2
    assert "validate" in capsys.readouterr().out
