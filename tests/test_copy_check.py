"""The copied_few_shot flag: exact n-gram boundaries, the row's own words excluded, and the flag on
the step, the row and the generate summary."""

from __future__ import annotations

import json
from pathlib import Path

from scripted import ScriptedEngine

from cai.prompts import load_few_shot
from cai.records import SFTRecord
from cai.stages.copy_check import CopyCheck, few_shot_texts, word_ngrams
from cai.stages.critique import CritiqueConfig, run_critique
from cai.store import read_records

EXAMPLE = "If you need internet, you could simply ask your neighbour to share, use a library or cafe hotspot"


def test_ngrams_are_lowercase_words_without_punctuation() -> None:
    assert word_ngrams("One, two! THREE", 2) == {("one", "two"), ("two", "three")}
    assert word_ngrams("too short", 3) == set()


def test_eight_shared_words_flag_and_seven_do_not() -> None:
    check = CopyCheck([EXAMPLE])
    words = EXAMPLE.split()
    assert check.copied("Sure. " + " ".join(words[:8]) + " and so on.")
    assert not check.copied("Sure. " + " ".join(words[:7]) + " and so on.")
    assert check.copied(EXAMPLE.upper().replace(",", " --"))  # case and punctuation do not hide a copy


def test_words_the_row_itself_supplies_are_not_a_copy() -> None:
    check = CopyCheck([EXAMPLE])
    assert not check.copied(EXAMPLE, own_texts=["The user wrote: " + EXAMPLE])
    # a copy longer than what the row supplies is still one
    assert check.copied(EXAMPLE, own_texts=[" ".join(EXAMPLE.split()[:9])])


def test_generate_flags_the_step_the_row_and_counts_it(tmp_path: Path, repo_root: Path) -> None:
    few_shot = repo_root / "prompts" / "critique_revision.yaml"
    copied = load_few_shot(few_shot).examples[0].revision
    assert copied in few_shot_texts(load_few_shot(few_shot))
    constitution = (repo_root / "tests" / "data" / "constitutions" / "valid.yaml").read_text()
    (tmp_path / "c.yaml").write_text(constitution.replace("few_shot: few_shot.yaml", f"few_shot: {few_shot}"))
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Plan a picnic?"}) + "\n"
                                      + json.dumps({"prompt": "Pick a lock?"}) + "\n")

    def paste_into_picnic(prompt: str, seed: int):
        if prompt.endswith("Revision:") and "picnic" in prompt.rsplit("Human:", 3)[-3]:
            return copied, "stop"
        return None

    config = CritiqueConfig(prompts=tmp_path / "p.jsonl", constitution=tmp_path / "c.yaml", out=tmp_path / "o.jsonl",
                            rounds=2)
    summary = run_critique(config, engine=ScriptedEngine([paste_into_picnic]), progress=False)
    rows = {r.prompt[0].content: r for r in read_records(tmp_path / "o.jsonl", SFTRecord)}
    picnic, lock = rows["Plan a picnic?"], rows["Pick a lock?"]
    assert [s.copied_few_shot for s in picnic.steps] == [True, False]  # round 2 repeats its own response
    assert picnic.flags.copied_few_shot and not lock.flags.copied_few_shot
    assert not any(s.copied_few_shot for s in lock.steps)
    assert summary.flags["copied_few_shot"] == 1
