"""`cai report RUN_DIR`: one self-contained HTML page about a pipeline run."""

from __future__ import annotations

import argparse

GROUP = None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="render a pipeline run as one self-contained HTML page",
        description="Per-stage summary, principle usage, critique-revise samples side by side, label position bias "
        "and calibration, reward-model and PPO curves, samples before and after PPO. The page embeds its figures "
        "and needs no network. Stages that have not run yet are shown as such.",
    )
    p.add_argument("run_dir", help="the run_dir of a `cai run` pipeline")
    p.add_argument("--out", help="output HTML file (default RUN_DIR/report.html)")
    p.add_argument("--samples", type=int, default=4, help="samples shown per section (default 4)")
    p.set_defaults(func=run_report_command)


def run_report_command(args: argparse.Namespace) -> int:
    from cai.report import write_report

    path = write_report(args.run_dir, args.out, args.samples)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0
