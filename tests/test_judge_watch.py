"""Reward-hacking watch: the judge's win rate of policy vs reference answers on a scripted judge,
and the divergence flag on synthetic traces (hacking, honest improvement, length padding)."""

from __future__ import annotations

import math

import pytest
from fakes import FakeEngine, PreferenceScore

from cai.constitution import load_constitution
from cai.conversation import Message
from cai.prompts import load_feedback_templates
from cai.stages.label import Labeler, LabelerSettings
from cai.train.judge_watch import WatchPoint, WatchThresholds, detect_divergence, judge_win_rate


def labeler(repo_root, quality: dict[str, float], first_bonus: float = 0.0) -> Labeler:
    settings = LabelerSettings(constitution=repo_root / "constitutions" / "harmless.yaml", principles=1, batch_size=2)
    return Labeler(settings, FakeEngine(PreferenceScore(quality, first_bonus)),
                   load_constitution(settings.constitution), load_feedback_templates())


def test_win_rate_is_the_mean_soft_label_and_identical_answers_count_half(repo_root) -> None:
    quality = {"GOOD": 0.0, "BAD": -2.0, "SAME": 0.0}
    judge = labeler(repo_root, quality, first_bonus=1.0)  # a slot bias that both orders cancel
    prompts = [[Message(role="user", content=f"q{i}")] for i in range(3)]
    result = judge_win_rate(judge, prompts, ["GOOD", "BAD", "SAME"], ["BAD", "GOOD", "SAME"])
    def first(x: float, y: float) -> float:
        return 1 / (1 + math.exp(y - x))

    win = (first(1.0, -2.0) + 1 - first(-1.0, 0.0)) / 2  # GOOD vs BAD, both orders, +1 for the first slot
    assert result.win_rate == pytest.approx((win + (1 - win) + 0.5) / 3)
    assert result.prompts == 3 and judge.calls == 1  # the identical pair needs no judge call
    with pytest.raises(ValueError):
        judge_win_rate(judge, prompts, ["GOOD"], ["BAD"])


def trace(rm: list[float], win: list[float], length: list[float]) -> list[WatchPoint]:
    return [WatchPoint(step=10 * (i + 1), rm_score=r, judge_win_rate=w, kl=0.01 * i, mean_length=n)
            for i, (r, w, n) in enumerate(zip(rm, win, length))]


def test_a_reward_hacking_trace_is_flagged() -> None:
    hacked = trace(rm=[0.0, 0.2, 0.5, 0.9, 1.4, 2.0], win=[0.52, 0.55, 0.5, 0.44, 0.38, 0.31],
                   length=[40, 44, 60, 85, 110, 140])
    d = detect_divergence(hacked)
    assert d.flagged and d.reasons == ["rm_up_judge_down", "length_without_win"]
    assert d.rm_start == pytest.approx(0.1) and d.rm_end == pytest.approx(1.7)
    assert d.win_start == pytest.approx(0.535) and d.win_end == pytest.approx(0.345)
    assert "RM score +0.10 -> +1.70" in d.message


def test_honest_improvement_and_short_traces_are_not_flagged() -> None:
    honest = trace(rm=[0.0, 0.3, 0.6, 0.9], win=[0.5, 0.55, 0.6, 0.66], length=[40, 48, 52, 60])
    assert not detect_divergence(honest).flagged  # longer answers, but the judge likes them more
    padded = trace(rm=[0.0, 0.0, 0.05, 0.05], win=[0.5, 0.5, 0.5, 0.5], length=[40, 40, 80, 80])
    assert detect_divergence(padded).reasons == ["length_without_win"]
    short = detect_divergence(trace(rm=[0.0, 5.0], win=[0.9, 0.1], length=[10, 100]), WatchThresholds(window=2))
    assert not short.flagged and "need 4" in short.message


def test_trace_is_read_from_the_judged_train_rows_of_a_ppo_log() -> None:
    from cai.train.judge_watch import trace_from_metrics

    rows = [{"split": "train", "step": 1, "score": 0.1, "kl": 0.0, "response_length": 30.0},
            {"split": "train", "step": 2, "score": 0.3, "kl": 0.1, "response_length": 32.0, "judge_win_rate": 0.55},
            {"split": "eval", "step": 2, "score": 0.2, "kl": 0.1, "response_length": 31.0, "judge_win_rate": 0.4}]
    assert trace_from_metrics(rows) == [WatchPoint(step=2, rm_score=0.3, judge_win_rate=0.55, kl=0.1, mean_length=32.0)]
