"""`cai report`: a self-contained page with every section, honest about stages that have not run,
escaping all text, and rendering in real headless Chromium without console errors."""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_pipeline import pipeline_yaml

from cai.cli import main
from cai.errors import CaiError
from cai.pipeline import STAGE_NAMES
from cai.report import SECTIONS, render_report
from cai.stages.eval import PolicyEvalSummary

NASTY = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished run and one stopped after the label stage, on prompts with HTML in them."""
    tmp = tmp_path_factory.mktemp("report")
    prompts = tmp / "prompts.jsonl"
    rows = [{"prompt": NASTY}] + [json.loads(x) for x in (repo_root / "examples" / "red_team_prompts.jsonl").open()][:5]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {}
    for name, until in (("full", []), ("partial", ["--until", "label"])):
        cfg = pipeline_yaml(tmp, tiny_model_dir, repo_root, run_dir=name, generate={"prompts": str(prompts)})
        assert main(["run", str(cfg), "--quiet", *until]) == 0
        out[name] = Path(yaml.safe_load(cfg.read_text())["run_dir"])
    out["hacked"] = hacked_copy(out["full"], tmp / "hacked")
    return out


def hacked_copy(run: Path, dest: Path) -> Path:
    """The full run with a PPO log whose judged steps show reward hacking (RM score up, judge win rate
    down, answers growing): what PPO writes once its log phase calls the judge every `judge_every` steps."""
    shutil.copytree(run, dest)
    rows = [{"split": "train", "step": s, "score": 0.3 * s, "kl": 0.02 * s, "response_length": 20.0 + 8 * s,
             "judge_win_rate": 0.55 - 0.04 * s} for s in range(1, 7)]
    (dest / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


def section_html(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.DOTALL)
    assert m, f"no section {sid}"
    return m.group(1)


def test_partial_run_has_every_section_and_says_what_has_not_run(runs: dict[str, Path]) -> None:
    page = render_report(runs["partial"])
    for sid in SECTIONS:
        section_html(page, sid)
    for sid in ("reward-model", "sft", "ppo", "reward-hacking", "eval", "refusals"):
        assert "has not run yet" in section_html(page, sid)
    for sid in ("principles", "samples"):
        assert "has not run yet" not in section_html(page, sid)
    labels = section_html(page, "labels")  # labels are there, the calibration against humans is not yet
    assert "position-bias rate" in labels and labels.count("has not run yet") == 1
    assert "the label_eval stage has not run yet" in labels
    summary = section_html(page, "summary")
    assert summary.count('<span class="status done">done</span>') == 2
    assert summary.count('<span class="status missing">not run</span>') == len(STAGE_NAMES) - 2


def test_all_text_is_escaped_and_the_page_is_self_contained(runs: dict[str, Path]) -> None:
    page = render_report(runs["full"])
    assert NASTY not in page and "<script" not in page and "onerror=alert" not in page.replace("&lt;img src=x onerror=alert", "")
    assert html_escaped(NASTY) in section_html(page, "samples")
    assert not re.search(r'(src|href)="(?!data:image/png;base64,|#)', page)  # no external resource at all
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 8  # label histogram, position bias, calibration; RM, SFT, PPO curves; Elo; refusals
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    for sid in SECTIONS:
        assert "has not run yet" not in section_html(page, sid)
    summary = PolicyEvalSummary.model_validate_json((runs["full"] / "eval" / "summary.json").read_text())
    ev = section_html(page, "eval")
    for h, g in zip(summary.elo.harmless.policies, summary.elo.helpful.policies):
        assert f"<td>{h.policy}</td><td class=\"num\">{h.elo:.0f}</td><td class=\"num\">{h.low:.0f} – {h.high:.0f}</td>" \
            f"<td class=\"num\">{g.elo:.0f}</td>" in ev
    shaky = min(summary.elo.harmless.position_consistent, summary.elo.helpful.position_consistent) < 0.5
    assert ("it mostly follows the answer&#x27;s slot" in ev.replace("It mostly", "it mostly")) == shaky
    refusals = section_html(page, "refusals")
    assert summary.refusals is not None
    first = summary.refusals.policies[0]
    assert f"<td>{first.policy}</td><td class=\"num\">{first.benign_refusal_judge.rate:.0%}" in refusals
    assert "Not measured: PPO logged no <code>judge_win_rate</code>" in section_html(page, "reward-hacking")


def test_labels_section_shows_agreement_per_principle_from_the_typed_summary(runs: dict[str, Path]) -> None:
    from cai.stages.label_eval import EvalSummary

    labels = section_html(render_report(runs["full"]), "labels")
    ev = EvalSummary.model_validate_json((runs["full"] / "label_eval" / "metrics.json").read_text())
    assert "Agreement with humans per principle" in labels and ev.metrics.per_principle
    for p in ev.metrics.per_principle:
        assert f'<td>{p.principle_id}</td><td class="num">{p.agreement.n}</td>' in labels


def test_reward_hacking_panel_flags_a_hacked_trace(runs: dict[str, Path]) -> None:
    panel = section_html(render_report(runs["hacked"]), "reward-hacking")
    assert "Divergence flagged (rm_up_judge_down, length_without_win)" in panel
    assert "RM score +0.45 -&gt; +1.65 while the judge win rate fell 0.49 -&gt; 0.33" in panel
    assert panel.count("data:image/png;base64,") == 1


def test_a_summary_that_does_not_fit_its_model_is_an_error_not_a_blank_section(runs: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    run = shutil.copytree(runs["full"], tmp_path / "run")
    path = run / "eval" / "summary.json"
    path.write_text(path.read_text().replace('"judged_pairs"', '"pairs_judged"'))
    with pytest.raises(CaiError, match=r"eval/summary.json: not a PolicyEvalSummary \(pairs_judged: Extra inputs"):
        render_report(run)


@pytest.mark.parametrize("stage, field, model", [("rm", "train_pairs", "RewardSummary"),
                                                 ("sft", "train_examples", "SFTSummary"),
                                                 ("ppo", "score_end", "PPOSummary")])
def test_a_renamed_trainer_summary_field_is_an_error(runs: dict[str, Path], tmp_path: Path, stage: str, field: str,
                                                      model: str) -> None:
    run = shutil.copytree(runs["full"], tmp_path / "run")
    path = run / stage / "summary.json"
    path.write_text(path.read_text().replace(f'"{field}"', f'"{field}_renamed"'))
    with pytest.raises(CaiError, match=rf"{stage}/summary.json: not a {model} \({field}: Field required"):
        render_report(run)


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_cli_writes_the_page(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r" / "page.html"
    assert main(["report", str(runs["full"]), "--out", str(out), "--samples", "2"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    assert section_html(page, "samples").count('<div class="sample">') == 2
    assert section_html(page, "eval").count('<div class="sample">') == 2
    assert main(["report", str(tmp_path / "nothing")]) == 1
    assert "is not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------- the browser


def chromium_binary() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


WIRE = """
import os, sys
r, w = int(sys.argv[1]), int(sys.argv[2])
os.dup2(r, 3)
os.dup2(w, 4)
for fd in {r, w} - {3, 4}:
    os.close(fd)
os.execvp(sys.argv[3], sys.argv[3:])
"""


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out): no driver,
    no network port, no Python dependency."""

    def __init__(self, binary: str, timeout: float = 30.0):
        self.timeout = timeout
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        self.profile = tempfile.mkdtemp(prefix="cai-chromium-")
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", f"--user-data-dir={self.profile}",
                "about:blank"]
        # A fresh single-threaded Python puts the pipe ends on fds 3 and 4, then becomes chromium.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WIRE, str(cmd_r), str(out_w), *args],
            pass_fds=(cmd_r, out_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._out_r, 1 << 16)
            if not chunk:
                raise EOFError("chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def open(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, session=True)
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._read())

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                         session=True)["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, and log entries at error level."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {p.get('args')}")
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path, width: int = 1280) -> None:
        metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", metrics, session=True)  # lay out at this width
        metrics["height"] = int(self.evaluate("document.documentElement.scrollHeight"))
        self.call("Emulation.setDeviceMetricsOverride", metrics, session=True)  # then show the whole page
        shot = self.call("Page.captureScreenshot", {"format": "png"}, session=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=10)
        except (OSError, RuntimeError, TimeoutError, EOFError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._out_r)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.mark.parametrize("which", ["full", "partial", "hacked"])
def test_report_renders_in_headless_chromium(runs: dict[str, Path], which: str, tmp_path: Path) -> None:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    page = tmp_path / "report.html"
    assert main(["report", str(runs[which]), "--out", str(page)]) == 0
    browser = Browser(binary)
    try:
        browser.open(page.as_uri())
        ids = browser.evaluate("[...document.querySelectorAll('main > section')].map(s => s.id)")
        assert ids == [*SECTIONS, "config"]
        titles = browser.evaluate("[...document.querySelectorAll('section h2')].map(h => h.textContent)")
        for title in ("Reward model", "Reward hacking watch", "Policies rated by the AI judge", "Over-refusal"):
            assert title in titles
        images = browser.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth])")
        assert all(done and width > 100 for done, width in images)
        assert len(images) == {"full": 8, "partial": 2, "hacked": 9}[which]  # hacked: + the reward-hacking panel
        shown = browser.evaluate("document.querySelectorAll('.missing-note').length")
        # partial: label_eval, rm, sft, ppo, reward-hacking, eval, refusals
        assert shown == (7 if which == "partial" else 0)
        flags = browser.evaluate("document.querySelectorAll('#reward-hacking .flag').length")
        assert flags == (1 if which == "hacked" else 0)
        browser.screenshot(tmp_path / "report.png")
        assert browser.problems() == []
        assert [u for u in browser.requests() if not u.startswith("data:image/png;base64,")] == [page.as_uri()]
    finally:
        browser.close()
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
