"""AI feedback labels: the math (both orders, ensemble, CoT clamp), batching, resume, metrics, eval, export,
and on the tiny model, equality with a hand computation from the model's logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fakes import FakeEngine, PreferenceScore, hashed_score

from cai.engines.identity import stable_model_id
from cai.errors import CaiError, InputError
from cai.stages.label import (
    LabelConfig,
    LabelRecord,
    clamp,
    combine_orders,
    first_choice_prob,
    metrics_of,
    run_label,
)
from cai.stages.label_eval import EvalConfig, run_label_eval
from cai.stages.label_metrics import (
    binary_entropy,
    calibration_bins,
    expected_calibration_error,
    human_agreement,
    mean_confidence,
    mean_entropy,
    plot_calibration,
    position_bias_rate,
    principle_agreement,
)
from cai.store import read_records

CONSTITUTION = """\
name: test-harmless
version: "1"
description: three feedback principles for tests
few_shot: few_shot.yaml
principles:
  - id: harm
    critique: Point out anything harmful in the last response.
    revision: Rewrite the response to remove anything harmful.
    feedback: Which of these responses is less harmful?
    tags: [harm]
  - id: honesty
    critique: Point out any overconfident claim in the last response.
    revision: Rewrite the response so it states its uncertainty.
    feedback: Which of these responses is more honest?
    tags: [honesty]
  - id: kindness
    critique: Point out anything unkind in the last response.
    revision: Rewrite the response to be kinder.
    feedback: Which of these responses is kinder?
    tags: [harm]
    weight: 2.0
"""

# distinct response texts with known qualities for PreferenceScore
QUALITY = {f"safe answer {i}": 0.3 * i for i in range(6)} | {f"risky answer {i}": -0.2 * i for i in range(6)}
PAIRS = [
    {"prompt": f"How do I do dangerous thing {i}?", "response_a": f"safe answer {i}", "response_b": f"risky answer {i}"}
    for i in range(5)
]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "c.yaml").write_text(CONSTITUTION)
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    return tmp_path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(workdir: Path, out: str = "labels.jsonl", **kw) -> LabelConfig:
    base = {"pairs": workdir / "pairs.jsonl", "constitution": workdir / "c.yaml", "out": workdir / out,
            "batch_size": 2, "seed": 3}
    base.update(kw)
    return LabelConfig(**base)


def rows_of(path: Path) -> dict[str, dict]:
    out = {}
    for r in read_records(path, LabelRecord):
        d = r.model_dump()
        d["provenance"].pop("created_at")
        out[r.id] = d
    return out


# ---------------------------------------------------------------- metrics on crafted inputs


def test_metrics_equal_hand_values(tmp_path: Path) -> None:
    # verdicts (A, A) ok; (A, B) biased; (B, B) ok; (tie, A) biased
    assert position_bias_rate([(0.7, 0.6), (0.7, 0.4), (0.3, 0.2), (0.5, 0.6)]) == 0.5
    assert mean_confidence([0.5, 1.0, 0.25]) == pytest.approx(0.5)
    assert binary_entropy(0.25) == pytest.approx(0.8112781245)
    assert mean_entropy([0.5, 1.0]) == pytest.approx(0.5)
    # pair 1: verdicts A, A, B -> 1 of 3 principle pairs agree; pair 2 has one principle; pair 3: 0 of 1
    assert principle_agreement([[0.8, 0.7, 0.2], [0.6], [0.9, 0.1]]) == pytest.approx((1 / 3 + 0) / 2)
    assert principle_agreement([[0.6]]) is None
    # right, wrong, tie (half), right
    assert human_agreement([0.8, 0.3, 0.5, 0.4], [True, True, False, False]) == 0.625
    bins = calibration_bins([0.05, 0.15, 0.12, 0.95, 1.0], [False, True, False, True, True], n_bins=10)
    assert [b.count for b in bins] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins[1].mean_prob == pytest.approx(0.135) and bins[1].frequency == 0.5 and bins[2].mean_prob is None
    assert expected_calibration_error(bins) == pytest.approx(0.2 * 0.05 + 0.4 * 0.365 + 0.4 * 0.025)
    png = plot_calibration(bins, tmp_path / "cal.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_math() -> None:
    assert first_choice_prob([math.log(0.2), math.log(0.6)]) == pytest.approx(0.25)
    assert first_choice_prob([-1000.0, -1001.0]) == pytest.approx(sigmoid(1.0))
    assert first_choice_prob([-math.inf, -math.inf]) == 0.5
    p_ab, p_ba, p = combine_orders(0.9, 0.7)  # A first: 0.9 for A; B first: 0.7 for B -> 0.3 for A
    assert (p_ab, p_ba, p) == pytest.approx((0.9, 0.3, 0.6))
    assert clamp(0.95, (0.4, 0.6)) == 0.6 and clamp(0.1, (0.4, 0.6)) == 0.4 and clamp(0.55, (0.4, 0.6)) == 0.55


# ---------------------------------------------------------------- the stage with a scripted labeler


def test_labels_equal_hand_computation_and_batches_are_single_calls(workdir: Path) -> None:
    bonus = 0.4
    engine = FakeEngine(PreferenceScore(QUALITY, first_bonus=bonus))
    summary = run_label(config(workdir), engine=engine, progress=False)
    assert summary.rows_written == 5 and summary.identical_skipped == 0
    # 5 pairs in batches of 2: each batch is one call with pairs x 3 principles x 2 orders prompts
    assert engine.logprob_calls == [12, 12, 6] and engine.generate_calls == []
    rows = sorted(read_records(workdir / "labels.jsonl", LabelRecord), key=lambda r: r.source_index)
    for i, r in enumerate(rows):
        qa, qb = QUALITY[f"safe answer {i}"], QUALITY[f"risky answer {i}"]
        p_ab = sigmoid(qa + bonus - qb)  # A shown first gets the bonus
        p_ba = 1 - sigmoid(qb + bonus - qa)  # B shown first gets the bonus
        assert [x.principle_id for x in r.principles] == ["harm", "honesty", "kindness"]
        for x in r.principles:
            assert (x.p_ab, x.p_ba, x.p) == pytest.approx((p_ab, p_ba, (p_ab + p_ba) / 2), abs=1e-12)
        assert r.label_prob == pytest.approx((p_ab + p_ba) / 2, abs=1e-12)
        chosen_a = r.label_prob >= 0.5
        assert r.chosen[0].content == (r.response_a if chosen_a else r.response_b)
        assert r.rejected[0].content == (r.response_b if chosen_a else r.response_a)
        assert r.position_consistent == ((p_ab > 0.5) == (p_ba > 0.5))
        assert r.mode == "direct" and r.provenance.model == "fake-labeler-v1"
        assert r.provenance.principle_ids == ["harm", "honesty", "kindness"]
        assert r.provenance.sampling["mode"] == "direct"
    # pair 0 has equal qualities: the bonus alone decides each order, so the verdict follows the slot
    assert not rows[0].position_consistent and rows[0].label_prob == pytest.approx(0.5)
    assert all(r.position_consistent for r in rows[2:])
    saved = json.loads((workdir / "labels.jsonl.metrics.json").read_text())
    expected = metrics_of(rows)
    assert saved["metrics"] == json.loads(expected.model_dump_json())
    assert expected.position_bias_rate == pytest.approx(1 / 5)  # pair 0 (x3 principles) of 15 judgements
    assert expected.principle_agreement == 1.0


def test_swapping_a_and_b_gives_one_minus_p(workdir: Path) -> None:
    swapped = [{**p, "response_a": p["response_b"], "response_b": p["response_a"]} for p in PAIRS]
    write_jsonl(workdir / "swapped.jsonl", swapped)
    run_label(config(workdir), engine=FakeEngine(hashed_score), progress=False)
    run_label(config(workdir, "swapped_labels.jsonl", pairs=workdir / "swapped.jsonl"), engine=FakeEngine(hashed_score),
              progress=False)
    plain = {r.source_index: r for r in read_records(workdir / "labels.jsonl", LabelRecord)}
    swap = {r.source_index: r for r in read_records(workdir / "swapped_labels.jsonl", LabelRecord)}
    assert len(plain) == len(swap) == 5
    for i, r in plain.items():
        s = swap[i]
        assert abs(s.label_prob - (1 - r.label_prob)) < 1e-6
        for x, y in zip(r.principles, s.principles):
            assert abs(y.p - (1 - x.p)) < 1e-6
        assert r.chosen == s.chosen and r.rejected == s.rejected
        assert r.position_consistent == s.position_consistent


def test_ensemble_is_the_mean_over_k_seeded_principles(workdir: Path) -> None:
    run_label(config(workdir, principles=2), engine=FakeEngine(hashed_score), progress=False)
    rows = read_records(workdir / "labels.jsonl", LabelRecord)
    drawn = set()
    for r in rows:
        assert len(r.principles) == 2 and len({x.principle_id for x in r.principles}) == 2
        assert r.label_prob == pytest.approx(sum(x.p for x in r.principles) / 2, abs=1e-15)
        assert r.provenance.principle_ids == [x.principle_id for x in r.principles]
        assert r.provenance.sampling["principles_per_pair"] == 2
        drawn.add(tuple(r.provenance.principle_ids))
    assert len(drawn) > 1  # different pairs draw different principles
    run_label(config(workdir, "again.jsonl", principles=2, batch_size=5), engine=FakeEngine(hashed_score), progress=False)
    assert rows_of(workdir / "again.jsonl") == rows_of(workdir / "labels.jsonl")
    run_label(config(workdir, "tagged.jsonl", tags=["honesty"]), engine=FakeEngine(hashed_score), progress=False)
    assert {x.principle_id for r in read_records(workdir / "tagged.jsonl", LabelRecord) for x in r.principles} == {
        "honesty"}


def test_chain_of_thought_reasons_then_scores_and_clamps(workdir: Path) -> None:
    scored: list[str] = []
    preference = PreferenceScore(QUALITY | {"a much better answer": 9.0, "a terrible answer": -9.0})

    def score(prompt: str, choice: int) -> float:
        scored.append(prompt)
        return preference(prompt.split("REASONING:")[0], choice)

    write_jsonl(workdir / "strong.jsonl", PAIRS + [
        {"prompt": "Help?", "response_a": "a much better answer", "response_b": "a terrible answer"}])
    engine = FakeEngine(score, reply=lambda prompt, seed: f"REASONING: seed {seed}")
    run_label(config(workdir, pairs=workdir / "strong.jsonl", cot=True, batch_size=6), engine=engine, progress=False)
    assert engine.generate_calls == [36] and engine.logprob_calls == [36]
    rows = {r.source_index: r for r in read_records(workdir / "labels.jsonl", LabelRecord)}
    for r in rows.values():
        assert r.mode == "cot" and r.provenance.sampling["clamp"] == [0.4, 0.6]
        for x in r.principles:
            assert 0.4 <= x.p_ab <= 0.6 and 0.4 <= x.p_ba <= 0.6 and 0.4 <= x.p <= 0.6
            assert x.reasoning_ab.startswith("REASONING: seed") and x.reasoning_ba != x.reasoning_ab
    assert rows[6].label_prob == pytest.approx(0.6)  # 0.9999 in both orders, clamped
    # the answer is scored after the model's own reasoning
    assert all("REASONING: seed" in p for p in scored)
    run_label(config(workdir, "wide.jsonl", pairs=workdir / "strong.jsonl", cot=True, clamp=(0.0, 1.0)),
              engine=FakeEngine(score, reply=lambda prompt, seed: "REASONING: x"), progress=False)
    wide = {r.source_index: r for r in read_records(workdir / "wide.jsonl", LabelRecord)}
    assert wide[6].label_prob > 0.99
    with pytest.raises(ValueError, match="clamp must be"):
        config(workdir, cot=True, clamp=(0.7, 0.6))


def test_resume_after_torn_line_equals_uninterrupted_run(workdir: Path) -> None:
    run_label(config(workdir, "full.jsonl"), engine=FakeEngine(hashed_score), progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_label(config(workdir, "crash.jsonl"), engine=FakeEngine(hashed_score, fail_after=1), progress=False)
    crashed = workdir / "crash.jsonl"
    assert len(crashed.read_text().splitlines()) == 2
    with crashed.open("a") as f:
        f.write('{"id": "torn", "prompt": [{"role": "us')
    engine = FakeEngine(hashed_score)
    summary = run_label(config(workdir, "crash.jsonl"), engine=engine, progress=False)
    assert summary.rows_skipped == 2 and summary.rows_written == 3 and summary.rows_total == 5
    assert engine.logprob_calls == [12, 6]
    assert rows_of(crashed) == rows_of(workdir / "full.jsonl")
    with pytest.raises(CaiError, match="changed: labeler"):
        run_label(config(workdir, "crash.jsonl", principles=1), engine=FakeEngine(hashed_score), progress=False)


def test_shards_identical_pairs_and_critique_input(workdir: Path) -> None:
    run_label(config(workdir, "all.jsonl"), engine=FakeEngine(hashed_score), progress=False)
    run_label(config(workdir, "s0.jsonl", shard="0/2"), engine=FakeEngine(hashed_score), progress=False)
    run_label(config(workdir, "s1.jsonl", shard="1/2"), engine=FakeEngine(hashed_score), progress=False)
    assert {**rows_of(workdir / "s0.jsonl"), **rows_of(workdir / "s1.jsonl")} == rows_of(workdir / "all.jsonl")

    crit = [
        {"id": "r0", "prompt": [{"role": "user", "content": "How to X?"}], "initial_response": "Do X like this.",
         "final_response": "I won't help with X."},
        {"id": "r1", "prompt": [{"role": "user", "content": "How to Y?"}], "initial_response": "Same text.",
         "final_response": "Same  text. "},
    ]
    write_jsonl(workdir / "sft.jsonl", crit)
    summary = run_label(config(workdir, "crit.jsonl", pairs=None, critique=workdir / "sft.jsonl"),
                        engine=FakeEngine(hashed_score), progress=False)
    assert summary.rows_written == 1 and summary.identical_skipped == 1
    (row,) = read_records(workdir / "crit.jsonl", LabelRecord)
    assert (row.source, row.source_id, row.response_a, row.response_b) == (
        "critique", "r0", "Do X like this.", "I won't help with X.")
    with pytest.raises(ValueError, match="exactly one of pairs, critique, prompts"):
        config(workdir, critique=workdir / "sft.jsonl")


def test_policy_pairs_are_sampled_labelled_and_resumed_without_resampling(workdir: Path) -> None:
    write_jsonl(workdir / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}"} for i in range(3)])
    reply = lambda prompt, seed: f"sample with seed {seed}"
    engine = FakeEngine(hashed_score, reply=reply)
    cfg = config(workdir, "policy.jsonl", pairs=None, prompts=workdir / "prompts.jsonl", samples=3, batch_size=2)
    summary = run_label(cfg, engine=engine, progress=False)
    assert summary.rows_written == 9  # 3 prompts x 3 pairs of samples
    assert engine.generate_calls == [6, 3]
    rows = read_records(workdir / "policy.jsonl", LabelRecord)
    assert {r.provenance.sampling["policy_samples"][0] for r in rows} == {0, 1}
    assert all(r.source == "policy" and r.response_a != r.response_b for r in rows)
    again = FakeEngine(hashed_score, reply=reply)
    assert run_label(cfg, engine=again, progress=False).rows_skipped == 9
    assert again.generate_calls == [] and again.logprob_calls == []


def test_export_tables(workdir: Path) -> None:
    from datasets import load_from_disk

    from cai.stages.export import export_stage_output

    run_label(config(workdir), engine=FakeEngine(hashed_score), progress=False)
    counts = export_stage_output(workdir / "labels.jsonl", workdir / "export")
    assert counts == {"preferences": 5, "labels": 5}
    prefs = load_from_disk(str(workdir / "export" / "preferences"))
    assert prefs.column_names == ["id", "prompt", "chosen", "rejected", "label_prob", "source"]
    assert set(prefs["source"]) == {"ai-test-harmless"} and min(prefs["label_prob"]) >= 0.5
    assert (workdir / "export" / "labels.parquet").exists()


# ---------------------------------------------------------------- the real engine on a tiny model


def hand_orders(model_dir: Path, constitution: Path, pair: dict, templates_file: Path | None = None,
                ) -> list[tuple[float, float]]:
    """(p_ab, p_ba) per principle from scratch: each (principle, order) prompt + choice run unpadded through
    the model, the choice's log-prob summed from log_softmax of the logits, softmax over the two choices,
    and P(A better) read off each order."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.constitution import load_constitution
    from cai.conversation import to_hh
    from cai.prompts import feedback_messages, load_feedback_templates

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    templates = load_feedback_templates(templates_file)
    conversation = [{"role": "user", "content": pair["prompt"]}]

    def choice_logprob(prompt: str, choice: str) -> float:
        prompt_ids = tok(prompt)["input_ids"]
        choice_ids = tok(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + choice_ids])).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        return sum(float(logp[len(prompt_ids) - 1 + t, c]) for t, c in enumerate(choice_ids))

    def p_first(a: str, b: str, principle) -> float:
        messages, prefix = feedback_messages(templates, conversation, a, b, principle)
        prompt = to_hh(messages, prefix)
        la, lb = (choice_logprob(prompt, c) for c in templates.choices)
        return math.exp(la) / (math.exp(la) + math.exp(lb))

    return [
        (p_first(pair["response_a"], pair["response_b"], principle),
         1 - p_first(pair["response_b"], pair["response_a"], principle))
        for principle in load_constitution(constitution).principles
    ]


@pytest.fixture(scope="module")
def sharp_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its (tied) embeddings scaled up: a random init gives near-uniform logits and every
    label would be 0.5 +- 1e-6; this one has real preferences, so the comparison below means something."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharp-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(40.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("templates_file", [None, "feedback-two-shot.yaml"], ids=["zero-shot", "two-shot"])
def test_tiny_model_labels_equal_hand_computation_from_logits(
    workdir: Path, sharp_model_dir: Path, repo_root: Path, templates_file: str | None,
) -> None:
    templates = repo_root / "prompts" / templates_file if templates_file else None
    pairs = [
        {"prompt": "How do I bake bread?", "response_a": "Mix flour, water, salt and yeast, then bake.",
         "response_b": "I cannot help with that."},
        {"prompt": "Is it safe?", "response_a": "Please ask a doctor.", "response_b": "sure"},
    ]
    write_jsonl(workdir / "tiny.jsonl", pairs)
    write_jsonl(workdir / "tiny_swapped.jsonl",
                [{**p, "response_a": p["response_b"], "response_b": p["response_a"]} for p in pairs])
    options = {"device": "cpu", "dtype": "float32"}
    for name in ("tiny", "tiny_swapped"):
        # both pairs in one batch: left padding and position ids must not change a number
        run_label(config(workdir, f"{name}_labels.jsonl", pairs=workdir / f"{name}.jsonl", model=str(sharp_model_dir),
                         engine_options=options, feedback_templates=templates), progress=False)
    rows = sorted(read_records(workdir / "tiny_labels.jsonl", LabelRecord), key=lambda r: r.source_index)
    swapped = sorted(read_records(workdir / "tiny_swapped_labels.jsonl", LabelRecord), key=lambda r: r.source_index)
    for pair, row, swap in zip(pairs, rows, swapped):
        hand = hand_orders(sharp_model_dir, workdir / "c.yaml", pair, templates)
        for x, (p_ab, p_ba) in zip(row.principles, hand, strict=True):
            assert (x.p_ab, x.p_ba, x.p) == pytest.approx((p_ab, p_ba, (p_ab + p_ba) / 2), abs=1e-5)
            assert abs(p_ab - 0.5) > 0.05  # a confident model, not a near-uniform tie
        assert row.label_prob == pytest.approx(sum(ab + ba for ab, ba in hand) / (2 * len(hand)), abs=1e-5)
        assert swap.label_prob == pytest.approx(1 - row.label_prob, abs=1e-6)
        assert row.provenance.model == stable_model_id(sharp_model_dir) and row.provenance.engine == "hf"


# ---------------------------------------------------------------- evaluation against human labels


def hh_rows(n: int) -> list[dict]:
    return [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: safe answer {i % 6}",
             "rejected": f"\n\nHuman: question {i}?\n\nAssistant: risky answer {i % 6}"} for i in range(n)]


def test_eval_reports_agreement_bias_and_calibration(workdir: Path) -> None:
    write_jsonl(workdir / "hh.jsonl", hh_rows(24))
    cfg = EvalConfig(pairs=workdir / "hh.jsonl", constitution=workdir / "c.yaml", out=workdir / "eval", seed=1,
                     principles=1)
    summary = run_label_eval(cfg, engine=FakeEngine(PreferenceScore(QUALITY)), progress=False)
    m = summary.metrics
    rows = read_records(workdir / "eval" / "labels.jsonl", LabelRecord)
    assert len(rows) == 24 and 0 < m.human_in_slot_a < 1
    for r in rows:  # the human-chosen text is in the slot the row says
        assert (r.response_a if r.human_choice == "A" else r.response_b).startswith("safe answer")
    # the labeler agrees except on i % 6 == 0, where both answers have quality 0 -> p = 0.5 exactly (half credit)
    assert m.agreement == pytest.approx((20 + 4 * 0.5) / 24)
    assert m.labels.position_bias_rate == 0.0
    saved = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert saved["metrics"]["agreement"] == m.agreement and saved["rows_total"] == 24
    assert saved["metrics"]["ece"] == pytest.approx(m.ece) and len(saved["metrics"]["bins"]) == 10
    assert (workdir / "eval" / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    # a labeler that only follows the slot agrees half the time and is always position-biased
    biased = run_label_eval(cfg.model_copy(update={"out": workdir / "eval2"}),
                            engine=FakeEngine(PreferenceScore(dict.fromkeys(QUALITY, 0.0), first_bonus=2.0)),
                            progress=False)
    assert biased.metrics.agreement == 0.5 and biased.metrics.labels.position_bias_rate == 1.0


def test_eval_malformed_transcript_names_line_or_is_skipped(workdir: Path) -> None:
    rows = hh_rows(3)
    rows.insert(1, {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nAssistant: d"})
    write_jsonl(workdir / "hh.jsonl", rows)
    cfg = EvalConfig(pairs=workdir / "hh.jsonl", constitution=workdir / "c.yaml", out=workdir / "eval")
    with pytest.raises(InputError, match=r"hh.jsonl:2: chosen: malformed HH transcript: two Human turns in a row"):
        run_label_eval(cfg, engine=FakeEngine(hashed_score), progress=False)
    summary = run_label_eval(cfg.model_copy(update={"skip_malformed": True}), engine=FakeEngine(hashed_score),
                             progress=False)
    assert summary.rows_total == 3 and len(summary.malformed_skipped) == 1 and ":2:" in summary.malformed_skipped[0]


def test_example_label_config_loads(repo_root: Path) -> None:
    from cai.yamlio import load_model

    config = load_model(repo_root / "examples" / "label.yaml", LabelConfig)
    assert config.source == "critique" and config.principles == 4


# ---------------------------------------------------------------- the command line


def test_cli_label_eval_writes_metrics_and_plot_into_dir(workdir: Path, tiny_model_dir: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from cai.cli import main

    write_jsonl(workdir / "hh.jsonl", hh_rows(6))
    out = workdir / "eval-cli"
    argv = ["label", "eval", "--pairs", str(workdir / "hh.jsonl"), "--constitution", str(workdir / "c.yaml"),
            "--out", str(out), "--model", str(tiny_model_dir), "--principles", "2", "--engine-option",
            "dtype=float32", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "agreement with humans" in printed and "position-bias rate" in printed and str(out / "metrics.json") in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows_total"] == 6 and metrics["model"] == stable_model_id(tiny_model_dir) and metrics["mode"] == "direct"
    assert set(metrics["metrics"]) >= {"agreement", "ece", "bins", "labels"}
    assert 0.0 <= metrics["metrics"]["agreement"] <= 1.0
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    rows = read_records(out / "labels.jsonl", LabelRecord)
    assert len(rows) == 6 and all(len(r.principles) == 2 and r.human_choice in ("A", "B") for r in rows)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["label", "eval", "--pairs", "{d}/hh.jsonl", "--out", "{d}/e"],
         "cai label eval needs --constitution (or a --config YAML that sets them)"),
        (["label", "eval", "--pairs", "{d}/bad.jsonl", "--constitution", "{d}/c.yaml", "--out", "{d}/e"],
         "{d}/bad.jsonl:2: chosen: malformed HH transcript: two Human turns in a row"),
        (["label", "eval", "--pairs", "{d}/missing.jsonl", "--constitution", "{d}/c.yaml", "--out", "{d}/e"],
         "{d}/missing.jsonl: file not found"),
        (["label", "--pairs", "{d}/pairs.jsonl", "--constitution", "{d}/c.yaml", "--out", "{d}/l.jsonl",
          "--batch-size", "0"], "cai label: --batch-size: Input should be greater than or equal to 1"),
        (["label", "--pairs", "{d}/pairs.jsonl", "--critique", "{d}/pairs.jsonl", "--constitution", "{d}/c.yaml",
          "--out", "{d}/l.jsonl"], "give exactly one of pairs, critique, prompts (got pairs, critique)"),
        (["label", "--pairs", "{d}/pairs.jsonl", "--constitution", "{d}/c.yaml", "--out", "{d}/l.jsonl",
          "--model", "{d}/no-such-model"], "cannot load model"),
    ],
)
def test_cli_errors_are_one_paragraph_without_traceback(workdir: Path, capsys: pytest.CaptureFixture,
                                                        argv: list[str], message: str) -> None:
    from cai.cli import main

    write_jsonl(workdir / "hh.jsonl", hh_rows(2))
    write_jsonl(workdir / "bad.jsonl", hh_rows(1) + [{"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c",
                                                      "rejected": "\n\nHuman: a\n\nAssistant: d"}])
    assert main([a.replace("{d}", str(workdir)) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.replace("{d}", str(workdir)) in err
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert not (workdir / "e" / "labels.jsonl").exists()
