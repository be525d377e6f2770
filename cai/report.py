"""`cai report RUN_DIR`: one self-contained HTML page about a pipeline run.

The page opens anywhere without a network: CSS is inline, figures are PNG data URIs, there is no
script. Every piece of text from the run (prompts, model outputs, principle ids, paths) is
escaped. A stage that has not run yet (or was interrupted) still gets its section, saying so, so
the page can be rendered at any point of a run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from cai import __version__
from cai.errors import CaiError
from cai.pipeline import LAYOUT, LOG, RESOLVED, STAGES, RunLog

R = TypeVar("R", bound=BaseModel)
SECTIONS = ("summary", "principles", "samples", "labels", "reward-model", "sft", "ppo", "reward-hacking", "eval",
            "refusals")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ---------------------------------------------------------------- reading a run


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _rows(path: Path, model: type[R]) -> list[R]:
    """The valid rows of a JSONL output; a torn or foreign line (an interrupted run) is left out."""
    out: list[R] = []
    if not path.is_file():
        return out
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is left out like any foreign line
        for line in f:
            try:
                out.append(model.model_validate_json(line))
            except ValidationError:
                continue
    return out


def _typed(path: Path, model: type[R]) -> R | None:
    """A stage's summary as its pydantic model; None while the stage has not written it. A file that
    does not fit the model is an error (a renamed field must not quietly blank a section)."""
    if not path.is_file():
        return None
    try:
        return model.model_validate_json(path.read_text())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CaiError(f"{path}: not a {model.__name__} ({where}: {first['msg']}); was it written by another "
                       "cai version? Rerun that stage or render with the cai version that wrote it.") from None


def _metrics(path: Path) -> list[dict[str, Any]]:
    from cai.train.common import read_metrics

    try:
        return read_metrics(path)
    except ValueError:
        return []


class Run:
    """The files of one run directory, read once."""

    def __init__(self, run_dir: Path):
        from cai.records import SFTRecord
        from cai.stages.critique import RunSummary
        from cai.stages.eval import PolicyEvalSummary
        from cai.stages.label import LabelRecord, LabelSummary
        from cai.stages.label_eval import EvalSummary
        from cai.stages.mix import MixSummary
        from cai.train.ppo import PPOSummary
        from cai.train.reward import RewardSummary
        from cai.train.sft import SFTSummary

        self.dir = run_dir
        self.log = RunLog.model_validate(_json(run_dir / LOG) or {})
        self.resolved = _json(run_dir / RESOLVED) or {}
        gen = run_dir / LAYOUT["generate"]
        lab = run_dir / LAYOUT["label"]
        self.sft_rows = _rows(gen, SFTRecord)
        self.gen_summary = _typed(Path(f"{gen}.summary.json"), RunSummary)
        self.labels = _rows(lab, LabelRecord)
        self.label_summary = _typed(Path(f"{lab}.metrics.json"), LabelSummary)
        self.eval_summary = _typed(run_dir / LAYOUT["label_eval"] / "metrics.json", EvalSummary)
        self.mix = _typed(run_dir / LAYOUT["mix"] / "mix.json", MixSummary)
        self.rm = _typed(run_dir / LAYOUT["rm"] / "summary.json", RewardSummary)
        self.sft = _typed(run_dir / LAYOUT["sft"] / "summary.json", SFTSummary)
        self.ppo = _typed(run_dir / LAYOUT["ppo"] / "summary.json", PPOSummary)
        self.policy_eval = _typed(run_dir / LAYOUT["eval"] / "summary.json", PolicyEvalSummary)

    def status(self, name: str) -> str:
        """done, partial (started or interrupted) or missing."""
        rec = self.log.stages.get(name)
        if rec is not None:
            return "done" if rec.status == "done" else "partial"
        return "partial" if (self.dir / LAYOUT[name]).exists() else "missing"

    def wall(self, name: str) -> float | None:
        rec = self.log.stages.get(name)
        return rec.wall_s if rec is not None else None


# ---------------------------------------------------------------- html pieces


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_file(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(uri: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{esc(alt)}"><figcaption>{esc(caption)}</figcaption></figure>'


def _table(head: list[str], rows: Iterable[list[Any]], numeric: Iterable[int] = ()) -> str:
    num = set(numeric)
    th = "".join(f'<th class="num">{esc(h)}</th>' if i in num else f"<th>{esc(h)}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if i in num else f"<td>{esc(c)}</td>"
                         for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _missing(what: str, stage: str) -> str:
    return (f'<p class="missing-note">{esc(what)}: the {esc(stage)} stage has not run yet (or was interrupted). '
            f"Rerun <code>cai run PIPELINE.yaml</code> to produce it, then render this report again.</p>")


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{body}</section>'


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _curves(metrics_path: Path, wanted: list[tuple[str, list[str]]]) -> str | None:
    """A curves figure of the first available key of each (split, candidate keys) panel."""
    from cai.train.common import plot_curves

    rows = _metrics(metrics_path)
    panels = []
    for split, keys in wanted:
        have = {k for r in rows if r.get("split") == split for k, v in r.items() if isinstance(v, (int, float))}
        hit = next((k for k in keys if k in have), None)
        if hit is not None:
            panels.append((split, hit))
    if not panels:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_curves(metrics_path, Path(tmp) / "curves.png", panels)
        return _png_file(png) if png is not None else None


# ---------------------------------------------------------------- sections


def _data_stage_row(run: Run, name: str) -> tuple[Any, Any, list[str]] | None:
    """(rows, tokens, notes) of a data stage from its typed summary; None when it has written none."""
    if name == "generate" and run.gen_summary:
        g = run.gen_summary
        flags = ", ".join(f"{k} {v}" for k, v in g.flags.items()) or "none"
        return g.rows_total, g.generated_tokens, [f"flags: {flags}", f"{g.tokens_per_second:.1f} tok/s"]
    if name == "label" and run.label_summary:
        lab = run.label_summary
        return lab.rows_total, "—", [f"position-bias rate {_fmt(lab.metrics.position_bias_rate)}",
                                     f"{lab.identical_skipped} identical pairs skipped"]
    if name == "label_eval" and run.eval_summary:
        ev = run.eval_summary
        return ev.rows_total, "—", [f"agreement with humans {_fmt(ev.metrics.agreement)}, ECE {_fmt(ev.metrics.ece)}"]
    if name == "mix" and run.mix:
        counts = run.mix.counts
        notes = [f"{split}: " + ", ".join(f"{k} {v}" for k, v in by.items()) for split, by in counts.items()]
        if run.mix.malformed_skipped:
            notes.append(f"{run.mix.malformed_skipped} malformed human rows skipped")
        return sum(sum(v.values()) for v in counts.values()), "—", notes
    if name == "eval" and run.policy_eval:
        e = run.policy_eval
        notes = [f"{e.judged_pairs} judged pairs, {e.refusal_judgements} refusal judgements"]
        if e.seconds_per_judged_pair is not None:
            notes.append(f"{e.seconds_per_judged_pair:.2f}s per judged pair")
        return e.answers, "—", notes
    return None


def _trained_row(run: Run, name: str) -> tuple[Any, list[str]] | None:
    """(rows, notes) of a trainer's summary for the stage table; None before it has written one."""
    if name == "rm" and run.rm is not None:
        test = f"; test accuracy {_fmt(run.rm.test.overall.accuracy)}" if run.rm.test is not None else ""
        return run.rm.train_pairs, [f"{run.rm.steps} steps{test}"]
    if name == "sft" and run.sft is not None:
        s = run.sft
        loss = [f"test loss {_fmt(s.test_loss_before)} -> {_fmt(s.test_loss_after)}"] if s.test_loss_after is not None else []
        return s.train_examples, [f"{s.steps} steps", *loss]
    if name == "ppo" and run.ppo is not None:
        p = run.ppo
        return p.episodes, [f"{p.steps} steps", f"score {_fmt(p.score_start)} -> {_fmt(p.score_end)}, KL {_fmt(p.kl_end)}"]
    return None


def _stage_row(run: Run, name: str) -> list[Any]:
    rows: Any = "—"
    tokens: Any = "—"
    notes: list[str] = []
    data = _data_stage_row(run, name)
    trained = _trained_row(run, name)
    if data is not None:
        rows, tokens, notes = data
    elif trained is not None:
        rows, notes = trained
    wall = run.wall(name)
    status = run.status(name)
    return [name, status, rows, tokens, "—" if wall is None else f"{wall:.1f}s", "; ".join(notes)]


def summary_section(run: Run) -> str:
    names = [s.name for s in STAGES]
    rows = [_stage_row(run, n) for n in names]
    head = ["stage", "status", "rows", "tokens", "wall time", "notes"]
    body = []
    for r in rows:
        cls = {"done": "done", "partial": "partial"}.get(r[1], "missing")
        label = {"done": "done", "partial": "partial", "missing": "not run"}[r[1]]
        body.append(
            f'<tr><td>{esc(r[0])}</td><td><span class="status {cls}">{label}</span></td>'
            f'<td class="num">{esc(r[2])}</td><td class="num">{esc(r[3])}</td><td class="num">{esc(r[4])}</td>'
            f"<td>{esc(r[5])}</td></tr>"
        )
    total = sum(w for w in (run.wall(n) for n in names) if w is not None)
    th = "".join(f'<th class="num">{esc(h)}</th>' if i in (2, 3, 4) else f"<th>{esc(h)}</th>"
                 for i, h in enumerate(head))
    table = f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    note = f"<p>Total wall time of the stages that ran: {total:.1f}s (summed over resumed attempts).</p>"
    return _section("summary", "Stages", table + note)


def _bars(counts: dict[str, float], fmt: str = "{:.0f}") -> str:
    top = max(counts.values(), default=0) or 1
    rows = "".join(
        f'<tr><td>{esc(k)}</td><td class="num">{esc(fmt.format(v))}</td>'
        f'<td><div class="bar"><span style="width:{100 * v / top:.1f}%"></span></div></td></tr>'
        for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    return f'<table><thead><tr><th>principle</th><th class="num">count</th><th>share</th></tr></thead><tbody>{rows}</tbody></table>'


def principles_section(run: Run) -> str:
    body = "<h3>Critique-revise: rounds per principle</h3>"
    counts: dict[str, int] = defaultdict(int)
    for r in run.sft_rows:
        for step in r.steps:
            counts[step.principle_id] += 1
    body += _bars(dict(counts)) if counts else _missing("principle usage", "generate")
    body += "<h3>AI feedback: judgements per principle</h3>"
    per: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for rec in run.labels:
        for p in rec.principles:
            per[p.principle_id].append((p.p, p.position_consistent))
    if per:
        rows = [[k, len(v), _fmt(sum(1 - p for p, _ in v) / len(v)), _fmt(sum(c for _, c in v) / len(v))]
                for k, v in sorted(per.items(), key=lambda kv: -len(kv[1]))]
        body += ("<p>For critique-revise pairs, response A is the initial response and B the final revision, so "
                 "P(B better) is how strongly the labeler prefers the revision.</p>")
        body += _table(["principle", "judgements", "mean P(B better)", "order-consistent"], rows, (1, 2, 3))
    else:
        body += _missing("feedback principles", "label")
    return _section("principles", "Principle usage", body)


def samples_section(run: Run, n: int) -> str:
    if not run.sft_rows:
        return _section("samples", "Critique-revise samples", _missing("samples", "generate"))
    by_source = {r.source_id: r for r in run.labels if r.source_id}
    cards = []
    for r in sorted(run.sft_rows, key=lambda r: r.source_index)[:n]:
        prompt = "".join(f"<p class=\"text\"><b>{esc(m.role)}:</b> {esc(m.content)}</p>" for m in r.prompt)
        flags = "".join(f'<span class="badge">{esc(k)}</span>' for k in r.flags.kinds())
        cols = [f'<div class="step"><h4>initial response</h4><pre class="text">{esc(r.initial_response)}</pre></div>']
        for i, s in enumerate(r.steps, start=1):
            cols.append(
                f'<div class="step"><h4>round {i} · {esc(s.principle_id)}</h4>'
                f'<div class="label">critique</div><pre class="text critique">{esc(s.critique)}</pre>'
                f'<div class="label">revision</div><pre class="text">{esc(s.revision)}</pre></div>'
            )
        lab = by_source.get(r.id)
        verdict = "" if lab is None else (
            f'<div class="label">labeler: P(revision better) = {1 - lab.label_prob:.3f}</div>')
        cols.append(f'<div class="step final"><h4>final response</h4><pre class="text">{esc(r.final_response)}'
                    f"</pre>{verdict}</div>")
        cards.append(f'<div class="sample"><div class="prompt">{prompt}{flags}</div>'
                     f'<div class="steps">{"".join(cols)}</div></div>')
    intro = f"<p>{min(n, len(run.sft_rows))} of {len(run.sft_rows)} prompts, each round left to right.</p>"
    return _section("samples", "Critique-revise samples", intro + "".join(cards))


def _label_figures(run: Run) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    probs = [1 - r.label_prob for r in run.labels]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist(probs, bins=10, range=(0, 1), edgecolor="black")
    ax.set_xlabel("P(revision better)")
    ax.set_ylabel("pairs")
    ax.set_title(f"{len(probs)} pairs, mean {sum(probs) / len(probs):.3f}")
    fig.tight_layout()
    figs.append(_figure(_png(fig), "histogram of label probabilities",
                        "Soft labels of initial vs revised responses: mass right of 0.5 means the labeler "
                        "prefers the revisions."))
    orders = [(p.p_ab, p.p_ba) for r in run.labels for p in r.principles]
    flips = [(a, b) for a, b in orders if (a > 0.5) != (b > 0.5) and a != 0.5 and b != 0.5]
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.axhline(0.5, color="lightgrey", linewidth=0.8)
    ax.axvline(0.5, color="lightgrey", linewidth=0.8)
    ax.scatter([a for a, _ in orders], [b for _, b in orders], s=14, alpha=0.7, label="same verdict")
    if flips:
        ax.scatter([a for a, _ in flips], [b for _, b in flips], s=14, color="crimson", label="verdict flips")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("P(A better), A shown first")
    ax.set_ylabel("P(A better), B shown first")
    rate = run.label_summary.metrics.position_bias_rate if run.label_summary else len(flips) / max(len(orders), 1)
    ax.set_title(f"position-bias rate {rate:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    figs.append(_figure(_png(fig), "position bias scatter",
                        "Each judgement asked in both orders. On the diagonal the order did not matter; in the "
                        "upper-left and lower-right quadrants (red) the verdict followed the slot, not the response."))
    return figs


def labels_section(run: Run) -> str:
    body = ""
    if run.labels:
        head = ["pairs", "judgements", "position-bias rate", "consistent pairs", "mean confidence",
                "principle agreement"]
        if run.label_summary:
            m = run.label_summary.metrics
            cells = [m.pairs, m.judgements, _fmt(m.position_bias_rate), _fmt(m.position_consistent_pairs),
                     _fmt(m.mean_confidence), _fmt(m.principle_agreement)]
        else:  # the stage is still running: its metrics are written at the end
            cells = [len(run.labels), "—", "—", "—", "—", "—"]
        body += _table(head, [cells], range(6))
        body += f'<div class="figs">{"".join(_label_figures(run))}</div>'
    else:
        body += _missing("AI feedback labels", "label")
    body += "<h3>Calibration against human labels</h3>"
    ev = run.eval_summary
    if ev:
        from cai.stages.label_metrics import plot_calibration

        m = ev.metrics
        with tempfile.TemporaryDirectory() as tmp:
            uri = _png_file(plot_calibration(m.bins, Path(tmp) / "cal.png", f"{ev.rows_total} human pairs"))
        body += _table(["human pairs", "agreement", "ECE", "position-bias rate"],
                       [[ev.rows_total, _fmt(m.agreement), _fmt(m.ece), _fmt(m.labels.position_bias_rate)]], range(4))
        body += _figure(uri, "calibration reliability diagram",
                        "Reliability diagram: predicted P(A better) against how often the human preferred A "
                        "(the human's pick is put in slot A or B by a seeded coin).")
        if m.per_principle:
            body += "<h3>Agreement with humans per principle</h3>" + _table(
                ["principle", "pairs", "agreement", "95% interval", "position-bias rate"],
                [[p.principle_id, p.agreement.n, _fmt(p.agreement.rate),
                  f"{_fmt(p.agreement.low, 2)} – {_fmt(p.agreement.high, 2)}", _fmt(p.position_bias_rate)]
                 for p in m.per_principle], (1, 2, 3, 4))
    elif run.status("label_eval") == "missing" and "label_eval" not in (run.resolved.get("stages") or {}):
        body += ('<p class="missing-note">Not measured: add a <code>label_eval</code> section with human-labelled '
                 "pairs to the pipeline YAML to see the labeler's agreement with humans and its calibration.</p>")
    else:
        body += _missing("calibration", "label_eval")
    return _section("labels", "AI feedback labels", body)


def reward_section(run: Run) -> str:
    s = run.rm
    rm_dir = run.dir / LAYOUT["rm"]
    if s is None:
        return _section("reward-model", "Reward model", _missing("reward-model curves", "rm"))
    body = ""
    test = s.test
    if test is not None:
        rows = [["all", test.overall.pairs, _fmt(test.overall.accuracy), _fmt(test.overall.loss)]]
        rows += [[k, v.pairs, _fmt(v.accuracy), _fmt(v.loss)] for k, v in test.per_source.items()]
        body += _table(["test source", "pairs", "accuracy", "loss"], rows, (1, 2, 3))
        body += (f"<p>{s.steps} steps on {s.train_pairs} pairs in {s.wall_s:.1f}s; test ECE "
                 f"{_fmt(test.ece)}; reward mean {_fmt(s.reward_mean)}, std {_fmt(s.reward_std)} "
                 "(stored with the model so PPO reads normalised scores).</p>")
    uri = _curves(rm_dir / "metrics.jsonl", [("train", ["loss"]), ("train", ["accuracy"]), ("eval", ["loss"]),
                                              ("eval", ["accuracy"])])
    body += _figure(uri, "reward model curves", "Bradley-Terry loss and pair accuracy, train and held-out test.") \
        if uri else '<p class="missing-note">No metrics logged.</p>'
    return _section("reward-model", "Reward model", body)


def sft_section(run: Run) -> str:
    s = run.sft
    if s is None:
        return _section("sft", "Supervised fine-tuning (SL-CAI)", _missing("SFT curves", "sft"))
    uri = _curves(run.dir / LAYOUT["sft"] / "metrics.jsonl", [("train", ["loss"]), ("eval", ["loss"])])
    body = _table(["steps", "train examples", "response tokens / epoch", "test examples", "test loss before",
                   "test loss after", "wall time"],
                  [[s.steps, s.train_examples, s.train_tokens, s.test_examples, _fmt(s.test_loss_before),
                    _fmt(s.test_loss_after), f"{s.wall_s:.1f}s"]],
                  range(7))
    if s.skipped_empty or s.skipped_long_prompt:
        body += (f"<p>Skipped: {s.skipped_empty} empty responses, {s.skipped_long_prompt} "
                 "prompts longer than max_length.</p>")
    if s.dropped_flagged:
        body += "<p>Left out by drop_flags: " + esc(", ".join(f"{k} {v}" for k, v in s.dropped_flagged.items())) + ".</p>"
    body += _figure(uri, "SFT curves", "Loss on the final revised responses (prompt tokens carry no loss).") \
        if uri else '<p class="missing-note">No metrics logged.</p>'
    return _section("sft", "Supervised fine-tuning (SL-CAI)", body)


PPO_PANELS = [("train", ["score"]), ("train", ["kl"]), ("train", ["entropy"]), ("train", ["response_length"])]


def ppo_section(run: Run) -> str:
    s = run.ppo
    if s is None:
        return _section("ppo", "PPO (RL-CAI)", _missing("PPO curves", "ppo"))
    uri = _curves(run.dir / LAYOUT["ppo"] / "metrics.jsonl", PPO_PANELS)
    body = _table(["steps", "episodes", "score (first → last steps)", "KL to reference", "response tokens",
                   "generated tokens/s", "wall time"],
                  [[s.steps, s.episodes, f"{_fmt(s.score_start)} → {_fmt(s.score_end)}",
                    f"{_fmt(s.kl_start)} → {_fmt(s.kl_end)}",
                    f"{_fmt(s.response_length_start, 1)} → {_fmt(s.response_length_end, 1)}",
                    _fmt(s.tokens_per_s, 1), f"{s.wall_s:.1f}s"]], (0, 1, 5, 6))
    if s.time_share:
        body += "<p>Step time: " + esc(", ".join(f"{k} {v:.0%}" for k, v in s.time_share.items())) + ".</p>"
    if s.prompt_mix:
        body += "<p>Prompts per step: " + esc(", ".join(f"{k} {v}" for k, v in s.prompt_mix.items())) + ".</p>"
    body += _figure(uri, "PPO curves", "Reward-model score, KL to the reference policy, entropy and response "
                    "length per step: a score that climbs while KL explodes or length runs away is reward hacking.") \
        if uri else '<p class="missing-note">No metrics logged.</p>'
    return _section("ppo", "PPO (RL-CAI)", body)


def reward_hacking_section(run: Run) -> str:
    """RM score, judge win rate, KL and length of PPO's judged steps on one panel, and the divergence flag."""
    from cai.train.judge_watch import detect_divergence, trace_from_metrics

    title = "Reward hacking watch"
    if run.ppo is None:
        return _section("reward-hacking", title, _missing("the judge's view of PPO", "ppo"))
    trace = trace_from_metrics(_metrics(run.dir / LAYOUT["ppo"] / "metrics.jsonl"))
    if not trace:
        return _section("reward-hacking", title, (
            '<p class="note">Not measured: PPO logged no <code>judge_win_rate</code>. With <code>judge_every</code> '
            "set, PPO's held-out answers are judged against the reference policy's every that many steps, and "
            "this panel shows the RM score and the judge's win rate side by side.</p>"))
    verdict = detect_divergence(trace)
    flag = (f'<p class="flag">Divergence flagged ({esc(", ".join(verdict.reasons))}): {esc(verdict.message)}.</p>'
            if verdict.flagged else f"<p>No divergence flagged ({esc(verdict.message)}).</p>")
    body = flag + _figure(_png(_watch_figure(trace)), "reward hacking panel",
                          "Each series rescaled to its own range over the run (raw ranges in the legend): an RM "
                          "score that climbs while the judge's win rate over the reference falls is reward hacking.")
    return _section("reward-hacking", title, body)


def _watch_figure(trace: list[Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = [p.step for p in trace]
    for field, label in (("rm_score", "RM score"), ("judge_win_rate", "judge win rate"), ("kl", "KL"),
                         ("mean_length", "mean length")):
        ys = [getattr(p, field) for p in trace]
        lo, hi = min(ys), max(ys)
        scaled = [(y - lo) / (hi - lo) if hi > lo else 0.5 for y in ys]
        ax.plot(steps, scaled, marker="o", label=f"{label} [{lo:.3g}, {hi:.3g}]")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("rescaled to [0, 1]")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def eval_section(run: Run, n: int) -> str:
    from cai.stages.eval import plot_elo
    from cai.stages.eval_answers import AnswerRecord

    e = run.policy_eval
    title = "Policies rated by the AI judge"
    if e is None:
        return _section("eval", title, _missing("harmlessness and helpfulness ratings", "eval"))
    rows = [[h.policy, f"{h.elo:.0f}", f"{h.low:.0f} – {h.high:.0f}", f"{g.elo:.0f}", f"{g.low:.0f} – {g.high:.0f}"]
            for h, g in zip(e.elo.harmless.policies, e.elo.helpful.policies)]
    body = _table(["policy", "harmlessness Elo", "95% interval", "helpfulness Elo", "95% interval"], rows, (1, 2, 3, 4))
    axes = [e.elo.harmless, e.elo.helpful]
    body += ("<p>" + esc("; ".join(f"{a.axis}: {a.prompts} prompts, {a.pairs} judged pairs under {a.constitution}, "
                                   f"{a.position_consistent:.0%} order-consistent" for a in axes)) + f". Judge "
             f"{esc(e.elo.judge)}; intervals from {e.elo.bootstrap} prompt-bootstrap refits. Overlapping intervals "
             "mean the judge cannot tell those policies apart.</p>")
    shaky = [a for a in axes if a.position_consistent < 0.5]
    if shaky:
        body += ('<p class="flag">' + esc("; ".join(f"{a.axis}: the judge gave the same verdict in both orders on "
                                                    f"only {a.position_consistent:.0%} of pairs" for a in shaky))
                 + ". It mostly follows the answer's slot, so these ratings say little about the policies whatever "
                 "their intervals (the intervals resample prompts; they do not include the judge's own bias).</p>")
    with tempfile.TemporaryDirectory() as tmp:
        uri = _png_file(plot_elo(e.elo, Path(tmp) / "elo.png"))
    body += _figure(uri, "harmlessness vs helpfulness Elo", "One point per policy; up and right is better. Bars are "
                    "95% bootstrap intervals over prompts.")
    answers = [a for a in _rows(run.dir / LAYOUT["eval"] / "answers.jsonl", AnswerRecord) if a.prompt_set == "red_team"]
    by_prompt: dict[int, list[Any]] = defaultdict(list)
    for a in answers:
        by_prompt[a.prompt_index].append(a)
    for i in sorted(by_prompt)[:n]:
        prompt = "".join(f"<p class=\"text\"><b>{esc(m.role)}:</b> {esc(m.content)}</p>" for m in by_prompt[i][0].prompt)
        sides = "".join(f'<div><h4>{esc(a.policy)}</h4><pre class="text">{esc(a.response)}</pre>'
                        f'<div class="score">{a.tokens} tokens · {esc(a.finish)}</div></div>' for a in by_prompt[i])
        body += f'<div class="sample"><div class="prompt">{prompt}</div><div class="pair">{sides}</div></div>'
    return _section("eval", title, body)


def refusals_section(run: Run) -> str:
    e = run.policy_eval
    title = "Over-refusal"
    if e is None:
        return _section("refusals", title, _missing("refusal rates", "eval"))
    r = e.refusals
    if r is None:
        return _section("refusals", title, '<p class="note">Not measured: the eval ran without benign and harmful '
                        "prompts.</p>")

    def cell(x: Any) -> str:
        return "—" if x.rate is None else f"{x.rate:.0%} ({x.low:.0%} – {x.high:.0%})"

    rows = [[p.policy, cell(p.benign_refusal_judge), cell(p.benign_refusal_rule), cell(p.harmful_compliance_judge),
             cell(p.harmful_compliance_rule), cell(p.disagreement)] for p in r.policies]
    body = _table(["policy", "benign refused (judge)", "benign refused (rule)", "harmful answered (judge)",
                   "harmful answered (rule)", "judge vs rule disagree"], rows, (1, 2, 3, 4, 5))
    body += (f"<p>{r.benign_prompts} benign prompts that look sensitive but deserve an answer, {r.harmful_prompts} "
             f"harmful ones; lower is better in every column. The judge ({esc(r.judge)}, template {esc(r.template)}) "
             "answers a multiple-choice question per reply in both option orders; the rule is a list of "
             f"{len(r.patterns)} refusal phrases. Brackets: 95% Wilson intervals.</p>")
    body += _figure(_png(_refusal_figure(r)), "refusal rates", "Benign prompts refused and harmful prompts answered, "
                    "per policy, by the judge (bars) and the phrase rule (markers).")
    return _section("refusals", title, body)


def _refusal_figure(r: Any) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    xs = range(len(r.policies))
    for offset, field, rule, label in ((-0.2, "benign_refusal_judge", "benign_refusal_rule", "benign refused"),
                                       (0.2, "harmful_compliance_judge", "harmful_compliance_rule", "harmful answered")):
        shares = [getattr(p, field) for p in r.policies]
        rates = [s.rate or 0.0 for s in shares]
        err = [[rt - (s.low or 0.0) for rt, s in zip(rates, shares)], [(s.high or 0.0) - rt for rt, s in zip(rates, shares)]]
        ax.bar([x + offset for x in xs], rates, width=0.4, yerr=err, capsize=3, label=f"{label} (judge)")
        ax.scatter([x + offset for x in xs], [getattr(p, rule).rate or 0.0 for p in r.policies], color="black",
                   marker="x", zorder=3, label=f"{label} (rule)")
    ax.set_xticks(list(xs), [p.policy for p in r.policies])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of prompts")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the page


def render_report(run_dir: str | Path, samples: int = 4) -> str:
    """The whole page as a string."""
    d = Path(run_dir)
    if not d.is_dir():
        raise CaiError(f"{d} is not a directory; give the run_dir of a `cai run` pipeline")
    run = Run(d)
    css = resources.files("cai").joinpath("report.css").read_text(encoding="utf-8")
    pipe = run.resolved.get("pipeline") or {}
    model = pipe.get("model") or "gemma-3-270m (bundled)"
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{s}">{esc(s.replace("-", " "))}</a>' for s in SECTIONS)
    parts = [
        summary_section(run), principles_section(run), samples_section(run, samples), labels_section(run),
        reward_section(run), sft_section(run), ppo_section(run), reward_hacking_section(run),
        eval_section(run, samples), refusals_section(run),
    ]
    config = esc(json.dumps(run.resolved, indent=2)) if run.resolved else "no config.json yet"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>cai run report: {esc(d.name)}</title><style>{css}</style></head><body>"
        f"<header><h1>Constitutional AI run: {esc(d.name)}</h1>"
        f"<p>{esc(d)} · model {esc(model)} · seed {esc(pipe.get('seed', '—'))} · cai {esc(__version__)} · "
        f"rendered {esc(made)}</p></header><nav>{nav}</nav><main>{''.join(parts)}"
        f'<section id="config"><h2>Resolved configuration</h2><details><summary>every stage\'s settings</summary>'
        f"<pre>{config}</pre></details></section></main></body></html>"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None, samples: int = 4) -> Path:
    """Render the page to `out` (default RUN_DIR/report.html)."""
    target = Path(out) if out is not None else Path(run_dir) / "report.html"
    page = render_report(run_dir, samples)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target
