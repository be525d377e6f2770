"""Constitution loading: the model, hashing, round trips, and every validation error with its line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai.cli import main
from cai.constitution import check_constitution, load_constitution
from cai.errors import CaiError, InputError

DATA = Path(__file__).parent / "data" / "constitutions"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_valid_constitution() -> None:
    c = load_constitution(DATA / "valid.yaml")
    assert (c.name, c.version) == ("test-valid", "2")
    assert [p.id for p in c.principles] == ["harm", "honesty", "refusal"]
    assert [p.weight for p in c.principles] == [2.0, 1.0, 0.5]
    assert c.principles[1].tags == ["honesty"]
    assert c.tags == ["harm", "helpfulness", "honesty", "safety"]
    assert c.source_path == DATA / "valid.yaml"
    assert c.few_shot_path == (DATA / "few_shot.yaml").resolve()
    # block scalars lose their trailing newline; doubled braces are literal text, kept as written
    assert c.principle("honesty").critique.endswith('including code such as {{"key": 1}} that may be wrong.')


def test_principle_lookup_and_tag_selection() -> None:
    c = load_constitution(DATA / "valid.yaml")
    assert c.principle("refusal").weight == 0.5
    with pytest.raises(CaiError, match="no principle 'nope'; its principles are: harm, honesty, refusal"):
        c.principle("nope")
    assert [p.id for p in c.select()] == ["harm", "honesty", "refusal"]
    assert [p.id for p in c.select([])] == ["harm", "honesty", "refusal"]
    assert [p.id for p in c.select(["safety"])] == ["harm", "refusal"]
    assert [p.id for p in c.select(["honesty", "helpfulness"])] == ["honesty", "refusal"]
    with pytest.raises(CaiError, match="no principle tagged saftey; its tags are: harm, helpfulness, honesty, safety"):
        c.select(["safety", "saftey"])


def test_sha256_ignores_formatting_and_key_order_but_not_content(tmp_path: Path) -> None:
    c = load_constitution(DATA / "valid.yaml")
    assert len(c.sha256) == 64 and int(c.sha256, 16) >= 0
    data = yaml.safe_load((DATA / "valid.yaml").read_text())
    shuffled = {k: data[k] for k in reversed(list(data))}
    shuffled["principles"] = [{k: p[k] for k in reversed(list(p))} for p in data["principles"]]
    shuffled["principles"][2]["weight"] = 0.50
    shuffled["principles"][0]["critique"] += "\n\n"
    (tmp_path / "few_shot.yaml").write_text("")
    # JSON is YAML too: same content in flow style, reversed key order and other whitespace
    reformatted = write(tmp_path, json.dumps(shuffled, indent=3))
    assert load_constitution(reformatted).sha256 == c.sha256
    shuffled["principles"][0]["weight"] = 3
    assert load_constitution(write(tmp_path, json.dumps(shuffled), "changed.yaml")).sha256 != c.sha256


def test_defaults_are_part_of_the_hash(tmp_path: Path) -> None:
    """Leaving out `weight: 1.0` or `tags: []` describes the same constitution."""
    base = (DATA / "missing_field.yaml").read_text() + "    feedback: Which is less harmful?\n"
    explicit = base + "    tags: []\n    weight: 1.0\n"
    assert load_constitution(write(tmp_path, base, "a.yaml")).sha256 == \
        load_constitution(write(tmp_path, explicit, "b.yaml")).sha256


@pytest.mark.parametrize("name", ["valid.yaml", "../../../constitutions/harmless.yaml",
                                  "../../../constitutions/helpful-honest.yaml"])
def test_yaml_round_trip(tmp_path: Path, name: str) -> None:
    c = load_constitution(DATA / name)
    again = load_constitution(write(tmp_path, c.to_yaml()))
    assert again.model_dump() == c.model_dump()
    assert again.sha256 == c.sha256
    assert again.to_yaml() == c.to_yaml()


def test_every_error_in_a_file_with_its_line_and_field() -> None:
    found = [(p.line, p.field, p.code) for p in check_constitution(DATA / "errors.yaml").problems]
    assert found == [
        (2, "version", "bad-type"),
        (5, "colour", "unknown-key"),
        (8, "principles[0].critique", "placeholder"),
        (9, "principles[0].revision", "unpaired"),
        (11, "principles[0].weight", "bad-weight"),
        (12, "principles[1].id", "duplicate-id"),
        (14, "principles[1].revision", "placeholder"),
        (16, "principles[1].critque", "unknown-key"),
        (17, "principles[2].critique", "unpaired"),
        (20, "principles[3].id", "bad-slug"),
        (20, "principles[3].feedback", "missing-field"),
        (23, "principles[3].tags[1]", "bad-slug"),
        (24, "principles[4]", "bad-type"),
    ]


def test_error_messages_say_what_to_fix() -> None:
    problems = check_constitution(DATA / "errors.yaml").problems
    messages = {(p.line, p.field): p.message for p in problems}
    assert messages[(2, "version")] == "must be text, got 3; quote it: version: \"3\""
    assert messages[(5, "colour")].startswith("unknown key 'colour'; allowed keys: name, version,")
    assert messages[(8, "principles[0].critique")].startswith("unknown placeholder {topic}:")
    assert messages[(9, "principles[0].revision")] == "critique has no matching revision (revision is empty)"
    assert messages[(11, "principles[0].weight")] == "weight must be a finite number greater than 0, got 0"
    assert messages[(12, "principles[1].id")] == "duplicate principle id 'first' (first used on line 7)"
    assert messages[(14, "principles[1].revision")] == "unbalanced brace; write {{ or }} for a literal brace"
    assert messages[(16, "principles[1].critque")] == "unknown key 'critque' (did you mean 'critique'?)"
    assert messages[(17, "principles[2].critique")] == "revision has no matching critique (critique is missing)"
    assert str(problems[0]) == f"{DATA / 'errors.yaml'}:2:version: error: {messages[(2, 'version')]} [bad-type]"


def test_load_raises_the_first_error_with_file_line_and_field() -> None:
    with pytest.raises(InputError) as err:
        load_constitution(DATA / "errors.yaml")
    assert (err.value.path, err.value.line, err.value.field) == (str(DATA / "errors.yaml"), 2, "version")
    with pytest.raises(InputError) as err:
        load_constitution(DATA / "missing_field.yaml")
    assert str(err.value) == f"{DATA / 'missing_field.yaml'}:6: principles[0].feedback: required field is missing"
    with pytest.raises(InputError) as err:
        load_constitution(DATA / "bad_syntax.yaml")
    assert err.value.line == 6 and "invalid YAML" in str(err.value)


HEAD = 'name: n\nversion: "1"\ndescription: d\nfew_shot: f.yaml\n'
KEYS = "name, version, description, few_shot, principles"
ONE = "principles:\n  - id: a\n    critique: Identify harm.\n    revision: Rewrite it.\n    feedback: Which?\n"


@pytest.mark.parametrize(("text", "line", "field", "code", "message"), [
    ("", 1, None, "not-a-mapping", f"the file is empty; expected keys {KEYS}"),
    ("- a\n- b\n", 1, None, "not-a-mapping", f"the top level is not a mapping; expected keys {KEYS}"),
    (HEAD + "principles: []\n", 5, "principles", "no-principles", "the constitution has no principles"),
    (HEAD + "principles:\n", 5, "principles", "no-principles", "the constitution has no principles"),
    (ONE + 'name: n\nversion: "1"\ndescription: "  "\nfew_shot: f.yaml\n', 8, "description", "empty-field",
     "must not be empty"),
    (HEAD.replace("name: n\n", "") + ONE, 1, "name", "missing-field", "required field is missing"),
    (HEAD + ONE + "    weight: -0.5\n", 10, "principles[0].weight", "bad-weight",
     "weight must be a finite number greater than 0, got -0.5"),
    (HEAD + ONE + "    weight: .inf\n", 10, "principles[0].weight", "bad-weight",
     "weight must be a finite number greater than 0, got inf"),
    (HEAD + ONE + "    weight: heavy\n", 10, "principles[0].weight", "bad-weight",
     "weight must be a finite number greater than 0, got 'heavy'"),
    (HEAD + ONE.replace("Identify harm.", "Identify {} harm."), 7, "principles[0].critique", "placeholder",
     "unknown placeholder {}: principle texts take no placeholders (write {{ and }} for literal braces)"),
    (HEAD + ONE.replace("Which?", "Which {a.b} or {c}?"), 9, "principles[0].feedback", "placeholder",
     "unknown placeholder {a.b}, {c}: principle texts take no placeholders (write {{ and }} for literal braces)"),
    (HEAD + ONE.replace("Which?", "Which } one?"), 9, "principles[0].feedback", "placeholder",
     "unbalanced brace; write {{ or }} for a literal brace"),
    (HEAD + ONE.replace("    revision: Rewrite it.\n", ""), 6, "principles[0].revision", "unpaired",
     "critique has no matching revision (revision is missing)"),
    (HEAD + ONE.replace("critique: Identify harm.", "critique:"), 7, "principles[0].critique", "unpaired",
     "revision has no matching critique (critique is empty)"),
    (HEAD + ONE + "    tags: harm\n", 10, "principles[0].tags", "bad-type", "input should be a valid list, got 'harm'"),
    (HEAD + ONE + "    feedback: Again?\n", 10, None, "yaml", "duplicate key 'feedback'"),
    (HEAD + ONE + "    colour: red\n", 10, "principles[0].colour", "unknown-key",
     "unknown key 'colour'; allowed keys: id, critique, revision, feedback, tags, weight"),
])
def test_single_errors(tmp_path: Path, text: str, line: int, field: str | None, code: str, message: str) -> None:
    (problem,) = check_constitution(write(tmp_path, text)).problems
    assert (problem.line, problem.field, problem.code, problem.message) == (line, field, code, message)
    assert problem.severity == "error"


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        load_constitution(tmp_path / "nope.yaml")


def test_show_prints_summary_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    c = load_constitution(DATA / "valid.yaml")
    assert main(["constitution", "show", str(DATA / "valid.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:7] == [
        "name:        test-valid",
        "version:     2",
        "description: A small valid constitution for tests.",
        f"sha256:      {c.sha256}",
        f"few-shot:    {(DATA / 'few_shot.yaml').resolve()}",
        "principles:  3  tags: harm, helpfulness, honesty, safety",
        "",
    ]
    assert out[7].split() == ["id", "weight", "share", "tags", "critique"]
    assert out[8].split()[:5] == ["harm", "2", "57%", "harm,safety", "Identify"]
    assert out[10].split()[:4] == ["refusal", "0.5", "14%", "helpfulness,safety"]
    assert all(len(line) <= 100 for line in out[7:])
    assert out[9].endswith("...")


def test_show_yaml_is_canonical(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["constitution", "show", "--yaml", str(DATA / "valid.yaml")]) == 0
    assert capsys.readouterr().out == load_constitution(DATA / "valid.yaml").to_yaml()


@pytest.mark.parametrize(("name", "expected"), [
    ("missing_field.yaml", "missing_field.yaml:6: principles[0].feedback: required field is missing"),
    ("bad_syntax.yaml", "bad_syntax.yaml:6: invalid YAML: expected ',' or ']', but got ':'"),
])
def test_show_on_a_bad_file_prints_one_paragraph(capsys: pytest.CaptureFixture[str], name: str,
                                                 expected: str) -> None:
    assert main(["constitution", "show", str(DATA / name)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {DATA}/{expected}\n"


def test_python_m_cai_reports_bad_yaml_without_traceback() -> None:
    bad = DATA / "bad_syntax.yaml"
    proc = subprocess.run([sys.executable, "-m", "cai", "constitution", "validate", str(bad)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        f"{bad}:6: error: invalid YAML: expected ',' or ']', but got ':' [yaml]",
        "1 error(s), 0 warning(s) in 1 file(s)",
    ]
