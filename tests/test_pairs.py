"""Reading pairs: HH transcripts (multi-turn, malformed), prompt/chosen/rejected forms, pairs to label,
critique rows, .jsonl.gz, and policy sampling seeds."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from fakes import FakeEngine

from cai.conversation import Message
from cai.engines.base import SamplingConfig
from cai.errors import InputError
from cai.stages.pairs import (
    read_critique_pairs,
    read_human_pairs,
    read_label_pairs,
    sample_index_pairs,
    sample_responses,
)

MULTI_TURN = "\n\nHuman: I want to get back at my coworker.\n\nAssistant: What happened?\n\nHuman: He took credit for my work."
CHOSEN = MULTI_TURN + "\n\nAssistant: That is unfair. Could you talk to your manager and show your drafts?"
REJECTED = MULTI_TURN + "\n\nAssistant: Put salt in his coffee every morning."


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_multi_turn_hh_transcripts_split_into_shared_context_and_last_turns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "hh.jsonl.gz", [{"chosen": CHOSEN, "rejected": REJECTED}] * 2, gz=True)
    pairs, skipped = read_human_pairs(path)
    assert len(pairs) == 2 and skipped == []
    p = pairs[0]
    assert [m.role for m in p.prompt] == ["user", "assistant", "user"]
    assert p.prompt[2].content == "He took credit for my work."
    assert p.chosen == "That is unfair. Could you talk to your manager and show your drafts?"
    assert p.rejected == "Put salt in his coffee every morning."
    assert p.label_prob == 1.0 and p.line == 1


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"chosen": "\n\nHuman: hi\n\nHuman: again\n\nAssistant: yo", "rejected": REJECTED},
         "malformed HH transcript: two Human turns in a row"),
        ({"chosen": "no turns at all", "rejected": REJECTED}, "malformed HH transcript: no '"),
        ({"chosen": MULTI_TURN, "rejected": REJECTED}, "does not end with an Assistant turn"),
        ({"chosen": CHOSEN.replace("coworker", "boss"), "rejected": REJECTED},
         "do not share their context (they first differ at turn 1)"),
        ({"chosen": CHOSEN}, "missing 'rejected'"),
    ],
)
def test_malformed_transcripts_name_the_line(tmp_path: Path, row: dict, message: str) -> None:
    good = {"chosen": CHOSEN, "rejected": REJECTED}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, good, row, good])
    with pytest.raises(InputError) as err:
        read_human_pairs(path)
    assert err.value.line == 3
    assert f"{path}:3" in str(err.value) and message in str(err.value)


def test_skip_malformed_keeps_going_and_reports_the_lines(tmp_path: Path) -> None:
    good = {"chosen": CHOSEN, "rejected": REJECTED}
    bad = {"chosen": "\n\nAssistant: hi\n\nAssistant: again", "rejected": REJECTED}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, bad, good, bad, good])
    pairs, skipped = read_human_pairs(path, skip_malformed=True)
    assert [p.line for p in pairs] == [1, 3, 5]
    assert [e.line for e in skipped] == [2, 4]
    pairs, _ = read_human_pairs(path, limit=2, skip_malformed=True)
    assert [p.line for p in pairs] == [1, 3]


def test_prompt_chosen_rejected_forms(tmp_path: Path) -> None:
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Capital of France?"}]
    rows = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "label_prob": 0.8},
        {"prompt": conv, "chosen": [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "Lyon."}]},
        {"chosen": conv + [{"role": "assistant", "content": "Paris."}],
         "rejected": conv + [{"role": "assistant", "content": "Lyon."}]},
    ]
    pairs, _ = read_human_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert pairs[0].prompt == [Message(role="user", content="Capital of France?")] and pairs[0].label_prob == 0.8
    assert [m.content for m in pairs[1].prompt] == ["Hi", "Hello", "Capital of France?"]
    assert pairs[1].prompt == pairs[2].prompt
    assert all((p.chosen, p.rejected) == ("Paris.", "Lyon.") for p in pairs)


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"prompt": "q", "chosen": "a", "rejected": "b", "label_prob": 1.5}, "label_prob", "must be a number in [0, 1]"),
        ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
          "rejected": "b"}, "prompt", "must end with a user turn"),
        ({"prompt": "q", "chosen": [{"role": "robot", "content": "a"}], "rejected": "b"}, "chosen", "bad message"),
    ],
)
def test_bad_prompt_chosen_rejected_rows_name_line_and_field(tmp_path: Path, row: dict, field: str, message: str) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(InputError) as err:
        read_human_pairs(path)
    assert (err.value.line, err.value.field) == (1, field) and message in err.value.detail


def test_pairs_to_label_and_critique_rows(tmp_path: Path) -> None:
    rows = [
        {"id": "x1", "prompt": "Q1", "response_a": "a1", "response_b": "b1"},
        {"prompt": [{"role": "user", "content": "Q2"}], "response_a": [{"role": "assistant", "content": "a2"}],
         "response_b": "b2"},
        {"prompt": "Q3", "chosen": "c3", "rejected": "r3"},
    ]
    pairs = read_label_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert [(p.prompt[-1].content, p.response_a, p.response_b, p.source_index) for p in pairs] == [
        ("Q1", "a1", "b1", 1), ("Q2", "a2", "b2", 2), ("Q3", "c3", "r3", 3)]
    assert pairs[0].source_id == "x1" and pairs[1].source_id is None
    assert len(read_label_pairs(tmp_path / "pairs.jsonl", limit=2)) == 2
    with pytest.raises(InputError, match=r"pairs2.jsonl:2: response_b: missing 'response_b'"):
        read_label_pairs(write_jsonl(tmp_path / "pairs2.jsonl", [rows[0], {"prompt": "Q", "response_a": "a"}]))

    crit = [{"id": "c1", "prompt": [{"role": "user", "content": "How to X?"}], "initial_response": "Do X.",
             "final_response": "I won't help with X.", "steps": []}]
    (pair,) = read_critique_pairs(write_jsonl(tmp_path / "sft.jsonl", crit))
    assert (pair.response_a, pair.response_b, pair.source_id) == ("Do X.", "I won't help with X.", "c1")
    with pytest.raises(InputError, match="missing 'final_response'"):
        read_critique_pairs(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "initial_response": "a"}]))


def test_policy_samples_use_per_row_seeds_independent_of_batch() -> None:
    assert sample_index_pairs(2) == [(0, 1)]
    assert sample_index_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    engine = FakeEngine(reply=lambda prompt, seed: f"{prompt[-12:]}|{seed}")
    convs = [[Message(role="user", content=f"question {i}")] for i in range(3)]
    sampling = SamplingConfig(temperature=1.0)
    together = sample_responses(engine, convs, 3, sampling, seeds=[100, 200, 300])
    alone = sample_responses(engine, convs[1:2], 3, sampling, seeds=[200])
    assert engine.generate_calls == [9, 3]
    assert engine.generate_seeds[0] == [100, 101, 102, 200, 201, 202, 300, 301, 302]
    assert together[1] == alone[0] and len(set(together[1])) == 3
