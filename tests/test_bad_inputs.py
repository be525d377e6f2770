"""Every command x every kind of bad input: one paragraph on stderr naming the file (and line), a
non-zero exit code, no traceback, and nothing written or changed in the workspace.

Each case is a row of CASES: the command line ({d} = the workspace, {m} = the tiny model), a setup
that plants the bad input, and the text the error must contain. Almost all fail before any model
loads; a few run in a subprocess to check what a user really sees (and that nothing hangs).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cai.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "constitutions"

LATIN1 = "caf\xe9 au lait".encode("latin-1")  # byte 0xe9 is not UTF-8 on its own
SURROGATE = '"\\ud83d"'  # a lone high surrogate, as JSON text
# "Billion laughs": 9 levels of 9 aliases expand to 9**9 strings if anything expands them.
BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)


def prompt_rows() -> list[dict]:
    return [{"prompt": "How do I pick a lock?"}, {"prompt": "Tell me a joke about cats."}]


def ai_rows() -> list[dict]:
    return [{"id": f"a{i}", "prompt": [{"role": "user", "content": f"q{i}"}], "response_a": f"safe {i}",
             "response_b": f"unsafe {i}", "label_prob": 0.8} for i in range(4)]


def human_rows() -> list[dict]:
    return [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"}
            for i in range(4)]


def pref_rows() -> list[dict]:
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
             "chosen": [{"role": "assistant", "content": f"good {i}"}],
             "rejected": [{"role": "assistant", "content": f"bad {i}"}], "label_prob": 1.0, "source": "human"}
            for i in range(4)]


def sft_rows() -> list[dict]:
    """Rows shaped like `cai generate` output (cai.records.SFTRecord)."""
    from cai.records import CritiqueStep, Flags, Provenance, SFTRecord

    step = CritiqueStep(principle_id="harm", critique="fine", revision="a revised answer", critique_tokens=1,
                        revision_tokens=3, critique_finish="stop", revision_finish="stop")
    prov = Provenance(constitution_name="c", constitution_sha256="0" * 64, principle_ids=["harm"], model="tiny",
                      engine="hf", seed=0, sampling={})
    return [SFTRecord(id=f"s{i}", source_index=i, prompt=[{"role": "user", "content": f"q{i}"}],
                      initial_response="an answer", initial_tokens=2, initial_finish="stop", steps=[step],
                      final_response="a revised answer", flags=Flags(), provenance=prov).model_dump(mode="json")
            for i in range(2)]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture()
def ws(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A workspace of good inputs that the cases spoil one at a time."""
    d = tmp_path / "ws"
    d.mkdir()
    shutil.copy(ROOT / "prompts" / "critique_revision.yaml", d / "few_shot.yaml")
    (d / "constitution.yaml").write_text((DATA / "valid.yaml").read_text())
    (d / "prompts.jsonl").write_text(jsonl(prompt_rows()))
    (d / "ai.jsonl").write_text(jsonl(ai_rows()))
    (d / "human.jsonl").write_text(jsonl(human_rows()))
    (d / "prefs.jsonl").write_text(jsonl(pref_rows()))
    (d / "sft-in.jsonl").write_text(jsonl(sft_rows()))
    (d / "gen.yaml").write_text(f"prompts: {d}/prompts.jsonl\nconstitution: {d}/constitution.yaml\n"
                                f"out: {d}/sft.jsonl\nmodel: {tiny_model_dir}\nrounds: 1\nmax_new_tokens: 4\n")
    (d / "rm.yaml").write_text(f"model: {tiny_model_dir}\ntrain_file: {d}/prefs.jsonl\nout_dir: {d}/rm\nmax_steps: 1\n")
    (d / "sft.yaml").write_text(f"model: {tiny_model_dir}\ntrain_file: {d}/sft-in.jsonl\nout_dir: {d}/sftrun\n"
                                "max_steps: 1\n")
    (d / "ppo.yaml").write_text(f"model: {tiny_model_dir}\nreward_model: {d}/rm/final\nout_dir: {d}/ppo\n"
                                f"prompts:\n  - file: {d}/prompts.jsonl\n")
    (d / "pipe.yaml").write_text(f"run_dir: {d}/run\nmodel: {tiny_model_dir}\nconstitution: {d}/constitution.yaml\n"
                                 f"generate:\n  prompts: {d}/prompts.jsonl\nmix:\n  human: [{d}/human.jsonl]\n")
    return d


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        data = content.replace("{d}", str(d)) if isinstance(content, str) else content
        (d / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return setup


def replace_in(name: str, old: str, new: str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / name).write_text((d / name).read_text().replace(old, new.replace("{d}", str(d))))
    return setup


def append_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        with (d / name).open("ab") as f:
            f.write(data)
    return setup


def mkdir(name: str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / name).mkdir(parents=True)
        (d / name / "keep.txt").write_text("the user's own file\n")
    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        for s in setups:
            s(d)
    return setup


@dataclass
class Case:
    name: str
    argv: str  # split on spaces after substitution
    setup: Callable[[Path], None] | None
    names: str  # the error must contain this ({d} substituted): the file, and the line where known
    code: int = 1
    stream: str = "err"  # constitution validate/lint report problems on stdout
    also: list[str] = field(default_factory=list)  # more text the message must contain


BAD_LINE = "not valid UTF-8 text (byte 0xe9"
PIPE_BOMB = "run_dir: {d}/run\n" + BOMB
LINE_3_LATIN1 = b'{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": "' + LATIN1 + b'"}\n'

CASES = [
    # 1. YAML alias bomb: refused where it is parsed, naming the line of the first anchor.
    Case("validate-bomb", "constitution validate {d}/bomb.yaml", write("bomb.yaml", BOMB), "{d}/bomb.yaml:1",
         code=2, stream="out", also=["anchors and aliases"]),
    Case("lint-bomb", "constitution lint {d}/bomb.yaml", write("bomb.yaml", BOMB), "{d}/bomb.yaml:1", code=2,
         stream="out"),
    Case("show-bomb", "constitution show {d}/bomb.yaml", write("bomb.yaml", BOMB), "{d}/bomb.yaml:1"),
    Case("generate-config-bomb", "generate --config {d}/bomb.yaml", write("bomb.yaml", BOMB), "{d}/bomb.yaml:1"),
    Case("generate-constitution-bomb", "generate --config {d}/gen.yaml --constitution {d}/bomb.yaml",
         write("bomb.yaml", BOMB), "{d}/bomb.yaml:1"),
    Case("generate-few-shot-bomb", "generate --config {d}/gen.yaml", write("few_shot.yaml", BOMB),
         "{d}/few_shot.yaml:1"),
    Case("label-config-bomb", "label --config {d}/bomb.yaml", write("bomb.yaml", BOMB), "{d}/bomb.yaml:1"),
    Case("mix-config-bomb", "mix --config {d}/bomb.yaml", write("bomb.yaml", BOMB), "{d}/bomb.yaml:1"),
    Case("train-rm-bomb", "train rm {d}/bomb.yaml", write("bomb.yaml", BOMB), "{d}/bomb.yaml:1"),
    Case("train-sft-bomb", "train sft {d}/bomb.yaml", write("bomb.yaml", BOMB), "{d}/bomb.yaml:1"),
    Case("train-ppo-bomb", "train ppo {d}/bomb.yaml", write("bomb.yaml", BOMB), "{d}/bomb.yaml:1"),
    Case("run-bomb", "run {d}/bomb.yaml --plan", write("bomb.yaml", PIPE_BOMB), "{d}/bomb.yaml:2"),
    Case("run-set-alias", "run {d}/pipe.yaml --plan --set seed=[&x,*x]", None, "<command line>",
         also=["not valid YAML"]),
    Case("rm-set-no-key", "train rm {d}/rm.yaml --set =1", None, "<command line>", also=["needs a key"]),
    Case("generate-engine-option-no-key", "generate --config {d}/gen.yaml --engine-option a..b=1", None,
         "<command line>", also=["needs a key"]),
    Case("rm-set-alias", "train rm {d}/rm.yaml --set lr=*x", None, "<command line>"),
    # 2. Non-UTF-8 bytes (and lone surrogates) in every kind of file we read: file and line.
    Case("validate-latin1", "constitution validate {d}/constitution.yaml",
         append_bytes("constitution.yaml", b"# " + LATIN1 + b"\n"), "{d}/constitution.yaml:", code=2, stream="out",
         also=[BAD_LINE]),
    Case("generate-config-latin1", "generate --config {d}/gen.yaml", append_bytes("gen.yaml", b"# " + LATIN1 + b"\n"),
         "{d}/gen.yaml:7", also=[BAD_LINE]),
    Case("generate-prompts-latin1", "generate --config {d}/gen.yaml", write("prompts.jsonl", LINE_3_LATIN1),
         "{d}/prompts.jsonl:3", also=[BAD_LINE]),
    Case("generate-prompts-gz-latin1", "generate --config {d}/gen.yaml --prompts {d}/p.jsonl.gz",
         write("p.jsonl.gz", gzip.compress(LINE_3_LATIN1)), "{d}/p.jsonl.gz:3", also=[BAD_LINE]),
    Case("generate-prompts-gz-cut-short", "generate --config {d}/gen.yaml --prompts {d}/p.jsonl.gz",
         write("p.jsonl.gz", gzip.compress(jsonl([{"prompt": f"q {i * i}"} for i in range(500)]).encode())[:-20]),
         "{d}/p.jsonl.gz",
         also=["not a readable gzip file"]),
    Case("mix-human-not-gzip", "mix --ai {d}/ai.jsonl --human {d}/h.jsonl.gz --out {d}/mix",
         write("h.jsonl.gz", jsonl(human_rows())), "{d}/h.jsonl.gz", also=["not a readable gzip file"]),
    Case("generate-prompts-csv-latin1", "generate --config {d}/gen.yaml --prompts {d}/p.csv",
         write("p.csv", b"prompt\nhello\n" + LATIN1 + b"\n"), "{d}/p.csv:3", also=[BAD_LINE]),
    Case("generate-prompts-json-latin1", "generate --config {d}/gen.yaml --prompts {d}/p.json",
         write("p.json", b'[{"prompt": "' + LATIN1 + b'"}]'), "{d}/p.json:1", also=[BAD_LINE]),
    Case("generate-prompts-json-torn", "generate --config {d}/gen.yaml --prompts {d}/p.json",
         write("p.json", '[{"prompt": 1'), "{d}/p.json", also=["cannot load as a dataset"]),
    Case("generate-few-shot-latin1", "generate --config {d}/gen.yaml",
         append_bytes("few_shot.yaml", b"# " + LATIN1 + b"\n"), "{d}/few_shot.yaml:", also=[BAD_LINE]),
    Case("label-critique-latin1", "label --critique {d}/sft-in.jsonl --constitution {d}/constitution.yaml "
         "--out {d}/labels.jsonl", write("sft-in.jsonl", b"\n" + LATIN1 + b"\n"), "{d}/sft-in.jsonl:2",
         also=[BAD_LINE]),
    Case("mix-ai-latin1", "mix --ai {d}/ai.jsonl --human {d}/human.jsonl --out {d}/mix",
         append_bytes("ai.jsonl", LATIN1 + b"\n"), "{d}/ai.jsonl:5", also=[BAD_LINE]),
    Case("label-eval-pairs-latin1", "label eval --pairs {d}/human.jsonl --constitution {d}/constitution.yaml "
         "--out {d}/eval", append_bytes("human.jsonl", LATIN1 + b"\n"), "{d}/human.jsonl:5", also=[BAD_LINE]),
    Case("mix-human-latin1", "mix --ai {d}/ai.jsonl --human {d}/human.jsonl --out {d}/mix",
         append_bytes("human.jsonl", LATIN1 + b"\n"), "{d}/human.jsonl:5", also=[BAD_LINE]),
    Case("mix-config-latin1", "mix --config {d}/mix.yaml", write("mix.yaml", b"ai: [x]\n# " + LATIN1),
         "{d}/mix.yaml:2", also=[BAD_LINE]),
    Case("train-rm-config-latin1", "train rm {d}/rm.yaml", append_bytes("rm.yaml", b"# " + LATIN1 + b"\n"),
         "{d}/rm.yaml:5", also=[BAD_LINE]),
    Case("train-rm-data-latin1", "train rm {d}/rm.yaml", append_bytes("prefs.jsonl", LATIN1 + b"\n"),
         "{d}/prefs.jsonl:5", also=[BAD_LINE]),
    Case("train-sft-data-latin1", "train sft {d}/sft.yaml", append_bytes("sft-in.jsonl", LATIN1 + b"\n"),
         "{d}/sft-in.jsonl:3", also=[BAD_LINE]),
    Case("train-ppo-config-latin1", "train ppo {d}/ppo.yaml", append_bytes("ppo.yaml", b"# " + LATIN1 + b"\n"),
         "{d}/ppo.yaml:6", also=[BAD_LINE]),
    Case("score-latin1", "score {m} --file {d}/human.jsonl", append_bytes("human.jsonl", LATIN1 + b"\n"),
         "{d}/human.jsonl:5", also=[BAD_LINE]),
    Case("export-latin1", "export {d}/sft-in.jsonl --out {d}/export", write("sft-in.jsonl", LATIN1 + b"\n"),
         "{d}/sft-in.jsonl:1", also=[BAD_LINE]),
    Case("run-latin1", "run {d}/pipe.yaml --plan", append_bytes("pipe.yaml", b"# " + LATIN1 + b"\n"),
         "{d}/pipe.yaml:8", also=[BAD_LINE]),
    Case("generate-prompts-surrogate", "generate --config {d}/gen.yaml",
         write("prompts.jsonl", '{"prompt": "ok"}\n{"prompt": ' + SURROGATE + "}\n"), "{d}/prompts.jsonl:2",
         also=["lone UTF-16 surrogate (\\ud83d)"]),
    Case("mix-ai-surrogate", "mix --ai {d}/ai.jsonl --human {d}/human.jsonl --out {d}/mix",
         append_bytes("ai.jsonl", b'{"prompt": ' + SURROGATE.encode() + b', "chosen": "a", "rejected": "b"}\n'),
         "{d}/ai.jsonl:5", also=["lone UTF-16 surrogate"]),
    Case("validate-surrogate", "constitution validate {d}/constitution.yaml",
         replace_in("constitution.yaml", "description: A small valid constitution for tests.",
                    'description: "\\ud83d"'), "{d}/constitution.yaml:3",
         code=2, stream="out", also=["lone UTF-16 surrogate"]),
    Case("generate-meta-torn", "generate --config {d}/gen.yaml",
         both(write("sft.jsonl", "{}\n"), write("sft.jsonl.meta.json", '{"stage": "crit')), "{d}/sft.jsonl.meta.json:1",
         also=["not valid JSON"]),
    Case("run-log-torn", "run {d}/pipe.yaml --plan", write("run/pipeline.json", '{"stages": {"generate": 3}}'),
         "{d}/run/pipeline.json", also=["is not a cai run log"]),
    Case("run-log-latin1", "run {d}/pipe.yaml --plan", write("run/pipeline.json", b'{"x": "' + LATIN1 + b'"}'),
         "{d}/run/pipeline.json:1", also=[BAD_LINE]),
    # 3. OS errors: a read-only place, a directory where a file belongs, a file where a directory belongs.
    Case("generate-out-readonly", "generate --config {d}/gen.yaml --out /sys/cai-test/out.jsonl", None,
         "/sys/cai-test", also=["permission denied"]),
    Case("mix-out-readonly", "mix --ai {d}/ai.jsonl --human {d}/human.jsonl --out /sys/cai-test-mix", None,
         "/sys/cai-test-mix", also=["permission denied"]),
    Case("export-out-readonly", "export {d}/sft-in.jsonl --out /sys/cai-test-export", None,
         "/sys/cai-test-export", also=["permission denied"]),
    Case("label-out-readonly", "label --critique {d}/sft-in.jsonl --constitution {d}/constitution.yaml --model {m} "
         "--out /sys/cai-test/labels.jsonl", None, "/sys/cai-test", also=["permission denied"]),
    Case("train-rm-out-readonly", "train rm {d}/rm.yaml --set out_dir=/sys/cai-test-rm", None, "/sys/cai-test-rm",
         also=["permission denied"]),
    Case("train-sft-out-readonly", "train sft {d}/sft.yaml --set out_dir=/sys/cai-test-sft", None,
         "/sys/cai-test-sft", also=["permission denied"]),
    Case("run-dir-readonly", "run {d}/pipe.yaml --quiet --set run_dir=/sys/cai-test-run", None, "/sys/cai-test-run",
         also=["permission denied"]),
    Case("report-out-readonly", "report {d} --out /sys/cai-test/report.html", None, "/sys/cai-test",
         also=["permission denied"]),
    Case("score-model-missing", "score {d}/plain --file {d}/human.jsonl",
         None, "{d}/plain", also=["does not exist"]),
    Case("generate-config-is-dir", "generate --config {d}/cfgdir", mkdir("cfgdir"), "{d}/cfgdir",
         also=["is a directory"]),
    Case("train-rm-config-is-dir", "train rm {d}/cfgdir", mkdir("cfgdir"), "{d}/cfgdir", also=["is a directory"]),
    Case("train-rm-data-is-dir", "train rm {d}/rm.yaml --set train_file={d}/datadir", mkdir("datadir"),
         "{d}/datadir", also=["is a directory"]),
    Case("validate-is-dir", "constitution validate {d}/cfgdir", mkdir("cfgdir"), "{d}/cfgdir", code=2,
         stream="out", also=["is a directory"]),
    Case("mix-out-is-file", "mix --ai {d}/ai.jsonl --human {d}/human.jsonl --out {d}/taken.txt",
         write("taken.txt", "keep me\n"), "{d}/taken.txt", also=["existing file"]),
    Case("export-out-is-file", "export {d}/sft-in.jsonl --out {d}/taken.txt",
         write("taken.txt", "keep me\n"), "{d}/taken.txt", also=["existing file"]),
    Case("generate-out-under-file", "generate --config {d}/gen.yaml --out {d}/taken.txt/out.jsonl",
         write("taken.txt", "keep me\n"), "{d}/taken.txt", also=["is a file, where a directory is needed"]),
    # 4. A directory as an output file, with or without --force: refused, never moved aside.
    Case("generate-out-dir", "generate --config {d}/gen.yaml --out {d}/outdir", mkdir("outdir"), "{d}/outdir",
         also=["is a directory"]),
    Case("generate-out-dir-force", "generate --config {d}/gen.yaml --out {d}/outdir --force", mkdir("outdir"),
         "{d}/outdir", also=["is a directory"]),
    Case("generate-out-dir-before-model", "generate --config {d}/gen.yaml --out {d}/outdir --model {d}/no-such-model",
         mkdir("outdir"), "{d}/outdir", also=["is a directory"]),  # refused before any model is looked for
    Case("label-out-dir-force", "label --critique {d}/sft-in.jsonl --constitution {d}/constitution.yaml "
         "--model {m} --out {d}/outdir --force", mkdir("outdir"), "{d}/outdir",
         also=["is a directory"]),
    # 9. Silent acceptance.
    Case("export-empty", "export {d}/sft-in.jsonl --out {d}/export", write("sft-in.jsonl", ""), "{d}/sft-in.jsonl",
         also=["no rows"]),
    Case("export-blank-lines", "export {d}/sft-in.jsonl --out {d}/export", write("sft-in.jsonl", "\n\n"),
         "{d}/sft-in.jsonl", also=["no rows"]),
    Case("score-plain-lm", "score {m} --file {d}/human.jsonl", None, "{m}", also=["not a trained reward model"]),
    Case("run-until-bogus-plan", "run {d}/pipe.yaml --until bogus --plan", None, "'bogus'",
         also=["unknown stage"]),
    Case("validate-few-shot-outside", "constitution validate {d}/constitution.yaml",
         replace_in("constitution.yaml", "few_shot: few_shot.yaml", "few_shot: ../../../../../../etc/passwd"),
         "{d}/constitution.yaml:4:few_shot", code=2, stream="out", also=["outside the constitution's folder"]),
    Case("lint-few-shot-outside", "constitution lint {d}/constitution.yaml",
         replace_in("constitution.yaml", "few_shot: few_shot.yaml", "few_shot: /etc/hostname"),
         "{d}/constitution.yaml:4:few_shot", code=2, stream="out", also=["--few-shot-dir"]),
    # 10. A reward model path that does not exist.
    Case("ppo-missing-reward-model", "train ppo {d}/ppo.yaml", None, "{d}/ppo.yaml:2: reward_model",
         also=["{d}/rm/final does not exist"]),
    Case("ppo-missing-reward-model-set", "train ppo {d}/ppo.yaml --set reward_model=./no/such/rm", None,
         "reward_model", also=["./no/such/rm does not exist"]),
    Case("ppo-missing-judge-model-set", "train ppo {d}/ppo.yaml --set reward_model={m} --set judge_model=./no/such/judge", None,
         "judge_model", also=["./no/such/judge does not exist"]),
    # Flags with a bad value.
    Case("export-drop-unknown-flag", "export {d}/sft-in.jsonl --out {d}/export --drop-flag nope", None,
         "--drop-flag", code=2, also=["invalid choice"]),
    Case("mix-min-confidence-range", "mix --ai {d}/ai.jsonl --human {d}/human.jsonl --out {d}/mix "
         "--min-confidence 0.7", None, "--min-confidence", also=["less than or equal to 0.5"]),
]


@pytest.fixture(autouse=True)
def _no_progress_bars():
    """Loading a model or a dataset draws a progress bar on stderr; the cases check stderr holds only
    the error."""
    import datasets
    from transformers.utils import logging

    logging.disable_progress_bar()
    datasets.disable_progress_bars()
    yield
    logging.enable_progress_bar()
    datasets.enable_progress_bars()


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def expand(text: str, d: Path, m: Path) -> str:
    return text.replace("{d}", str(d)).replace("{m}", str(m))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clean_paragraph(case: Case, ws: Path, tiny_model_dir: Path, capsys, one_thread) -> None:
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws)
    argv = [expand(a, ws, tiny_model_dir) for a in case.argv.split(" ")]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse rejects a flag value itself (exit 2, usage + one error line)
        code = e.code
    out, err = capsys.readouterr()
    text = out if case.stream == "out" else err
    assert code == case.code, (code, out, err)
    assert "Traceback" not in out + err
    for needle in [case.names, *case.also]:
        assert expand(needle, ws, tiny_model_dir) in text, (needle, text)
    if case.stream == "err" and code == 1:
        assert err.startswith("error: ") and err.count("\n") == 1, err  # one paragraph
    assert snapshot(ws) == before  # nothing written, nothing changed, no directory moved aside


# ---------------------------------------------------------------- what a user sees (subprocesses)

def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cai", *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env=env, cwd=ROOT)


def test_alias_bomb_fails_in_seconds_without_traceback(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    r = cli("constitution", "validate", str(bomb), timeout=60)  # expanded, it would take minutes and gigabytes
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bomb}:1: error: invalid YAML: anchors and aliases (&a / *a) are not allowed" in r.stdout


def test_os_error_is_one_paragraph_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    ai, human = tmp_path / "ai.jsonl", tmp_path / "human.jsonl"
    ai.write_text(jsonl(ai_rows()))
    human.write_text(jsonl(human_rows()))
    argv = ["mix", "--ai", str(ai), "--human", str(human), "--out", "/sys/cai-test-mix"]
    r = cli(*argv)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: permission denied: /sys/cai-test-mix.") and r.stderr.count("\n") == 1
    for flag in ("--debug", "--traceback"):
        r = cli(flag, *argv)
        assert r.returncode == 1 and "Traceback" in r.stderr and "PermissionError" in r.stderr


def test_non_utf8_prompts_name_file_and_line_in_a_subprocess(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(LINE_3_LATIN1)
    r = cli("generate", "--prompts", str(prompts), "--constitution", str(ROOT / "constitutions" / "harmless.yaml"),
            "--out", str(tmp_path / "out.jsonl"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr == f"error: {prompts}:3: {BAD_LINE} at column 16); save the file as UTF-8\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


# ---------------------------------------------------------------- disk full: what is kept

def enospc_after(calls: int) -> Callable[[int], None]:
    """An os.fsync that fails like a full disk once `calls` calls have succeeded."""
    real = os.fsync
    done = [0]

    def fsync(fd: int) -> None:
        if done[0] >= calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        done[0] += 1
        real(fd)
    return fsync


def test_mix_disk_full_leaves_the_previous_mix_whole(ws: Path, monkeypatch, capsys) -> None:
    argv = ["mix", "--ai", f"{ws}/ai.jsonl", "--human", f"{ws}/human.jsonl", "--out", f"{ws}/mix", "--test-size",
            "0.25"]
    assert main(argv) == 0
    before = snapshot(ws / "mix")
    assert sorted(before) == ["mix.json", "test.jsonl", "train.jsonl"]
    import cai.stages.mix

    monkeypatch.setattr(cai.stages.mix.os, "fsync", enospc_after(1))  # train written, test fails
    capsys.readouterr()
    assert main([*argv, "--seed", "9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: disk full while writing a file.") and "`cai mix`" in err and err.count("\n") == 1
    assert snapshot(ws / "mix") == before  # the old train, test and mix.json, and no temporary files


def test_generate_disk_full_keeps_whole_rows_and_resumes(ws: Path, monkeypatch, capsys, one_thread) -> None:
    argv = ["generate", "--config", f"{ws}/gen.yaml", "--batch-size", "1", "--quiet"]
    import cai.store

    monkeypatch.setattr(cai.store.os, "fsync", enospc_after(1))  # the first row is durable, the second is not
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    # the store names its file and the rows it kept (1: the second row's fsync failed and was undone)
    assert err.startswith(f"error: {ws / 'sft.jsonl'}: the disk is full. The 1 complete row")
    assert "are kept" in err and "rerun the same command" in err
    rows = [json.loads(line) for line in (ws / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == 1  # whole rows only
    monkeypatch.undo()
    assert main(argv) == 0
    rows = [json.loads(line) for line in (ws / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and len({r["id"] for r in rows}) == 2


# ---------------------------------------------------------------- the opt-outs and filters work

def test_shared_few_shot_folder_is_allowed_when_named(tmp_path: Path, capsys) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "cons").mkdir()
    shutil.copy(ROOT / "prompts" / "critique_revision.yaml", tmp_path / "shared" / "fs.yaml")
    text = (DATA / "valid.yaml").read_text().replace("few_shot: few_shot.yaml", "few_shot: ../shared/fs.yaml")
    (tmp_path / "cons" / "c.yaml").write_text(text)
    assert main(["constitution", "validate", str(tmp_path / "cons" / "c.yaml")]) == 2
    assert "[few-shot-outside]" in capsys.readouterr().out
    assert main(["constitution", "validate", str(tmp_path / "cons" / "c.yaml"),
                 "--few-shot-dir", str(tmp_path / "shared")]) == 0
    assert main(["constitution", "validate", str(ROOT / "constitutions" / "harmless.yaml")]) == 0  # bundled prompts/


def test_mix_min_confidence_and_drop_flag_are_counted(tmp_path: Path, capsys) -> None:
    rows = [{**r, "label_prob": p} for r, p in zip(ai_rows(), [0.5, 0.45, 0.62, 0.1])]
    rows[3]["flags"] = {"copied_few_shot": True, "truncated": False}
    rows.append({**ai_rows()[0], "id": "a4", "label_prob": 0.3, "flags": ["truncated"]})
    ai, human = tmp_path / "ai.jsonl", tmp_path / "human.jsonl"
    ai.write_text(jsonl(rows))
    human.write_text(jsonl(human_rows()))
    out = tmp_path / "mix"
    assert main(["mix", "--ai", str(ai), "--human", str(human), "--out", str(out), "--ai-count", "2",
                 "--human-count", "2", "--test-size", "0", "--min-confidence", "0.1",
                 "--drop-flag", "copied_few_shot"]) == 0
    summary = json.loads((out / "mix.json").read_text())
    # 0.5 and 0.45 (oriented 0.55) are within 0.1 of a coin flip; 0.62, and 0.3 (oriented 0.7) are kept;
    # 0.1 carries copied_few_shot. A list-form flag that is not listed keeps its row.
    assert summary["dropped"] == {"low_confidence": 2, "flag:copied_few_shot": 1}
    kept = {r["id"] for r in (json.loads(x) for x in (out / "train.jsonl").read_text().splitlines())
            if r["source"] == "ai-harmless"}
    assert kept == {"a2", "a4"}
    assert "dropped AI rows: flag:copied_few_shot=1, low_confidence=2" in capsys.readouterr().out


def test_export_drops_flagged_rows_and_refuses_an_all_dropped_file(ws: Path, capsys) -> None:
    rows = sft_rows()
    rows[1]["flags"]["copied_few_shot"] = True
    (ws / "sft-in.jsonl").write_text(jsonl(rows))
    assert main(["export", f"{ws}/sft-in.jsonl", "--out", f"{ws}/export", "--drop-flag", "copied_few_shot"]) == 0
    out = capsys.readouterr().out
    assert f"{ws}/export/messages: 1 rows" in out and "dropped: flag:copied_few_shot=1" in out
    assert sorted(p.name for p in (ws / "export").iterdir()) == [
        "messages", "messages.parquet", "pairs", "pairs.parquet", "prompt_completion", "prompt_completion.parquet"]
    (ws / "sft-in.jsonl").write_text(jsonl(rows[1:]))
    assert main(["export", f"{ws}/sft-in.jsonl", "--out", f"{ws}/export2", "--drop-flag", "copied_few_shot"]) == 1
    assert "every one of its 1 rows was dropped" in capsys.readouterr().err
    assert not (ws / "export2").exists()


def test_hashing_refuses_a_lone_surrogate_plainly() -> None:
    from cai.errors import CaiError
    from cai.hashing import sha256_of

    with pytest.raises(CaiError, match=r"lone UTF-16 surrogate \(\\ud83d\)"):
        sha256_of({"prompt": "hi \ud83d"})
    assert sha256_of({"prompt": "hi \U0001f600"}) == sha256_of({"prompt": "hi 😀"})  # a full pair is one character


def test_report_leaves_out_a_line_that_is_not_utf8(tmp_path: Path, capsys) -> None:
    gen = tmp_path / "run" / "generate" / "critique.jsonl"
    gen.parent.mkdir(parents=True)
    rows = sft_rows()
    gen.write_bytes(jsonl(rows[:1]).encode() + LATIN1 + b"\n" + b'{"id": ' + SURROGATE.encode() + b"}\n"
                    + jsonl(rows[1:]).encode())
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.html")]) == 0
    assert "Traceback" not in capsys.readouterr().err
    from cai.report import Run

    assert [r.id for r in Run(tmp_path / "run").sft_rows] == ["s0", "s1"]


def test_rows_the_engine_refused_are_never_trained_on(ws: Path, tmp_path: Path, capsys) -> None:
    """A row written with an engine error (Ray's bad-row path) has no responses: export and mix always drop it."""
    rows = sft_rows()
    rows[0]["flags"]["error"] = "prompt rejected by the engine"
    (ws / "sft-in.jsonl").write_text(jsonl(rows))
    assert main(["export", f"{ws}/sft-in.jsonl", "--out", f"{ws}/export"]) == 0
    assert "dropped: flag:error=1" in capsys.readouterr().out
    ai = [{**r, "label_prob": 0.9} for r in ai_rows()]
    ai[0]["error"] = "prompt rejected by the engine"
    (tmp_path / "ai.jsonl").write_text(jsonl(ai))
    (tmp_path / "human.jsonl").write_text(jsonl(human_rows()))
    assert main(["mix", "--ai", str(tmp_path / "ai.jsonl"), "--human", str(tmp_path / "human.jsonl"),
                 "--out", str(tmp_path / "mix"), "--test-size", "0"]) == 0
    summary = json.loads((tmp_path / "mix" / "mix.json").read_text())
    assert summary["dropped"] == {"flag:error": 1}
    kept = [json.loads(x)["id"] for x in (tmp_path / "mix" / "train.jsonl").read_text().splitlines()]
    assert ai[0]["id"] not in kept
