"""`cai run PIPELINE.yaml`: every stage from red-team prompts to the RL-CAI policy in one run directory."""

from __future__ import annotations

import argparse

GROUP = None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the whole pipeline (generate, label, mix, rm, sft, ppo, eval) into one run directory",
        description="Run critique-revise -> AI feedback labels (-> labeler vs human labels) -> mix -> reward model "
        "-> SFT -> PPO -> eval (policies rated by the AI judge) as configured by PIPELINE.yaml. Each stage writes under RUN_DIR/<stage>; a stage that is already done is skipped and an "
        "interrupted one resumes, so rerunning the same command after a crash finishes the run. "
        "Then `cai report RUN_DIR` renders the results as one HTML page.",
    )
    p.add_argument("pipeline", help="pipeline YAML (see examples/pipeline.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field: a top-level one (seed=1) or a stage's (generate.limit=8, "
                   "rm.lr=2e-5); repeatable")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--restart", metavar="STAGE", action="append", default=[],
                   help="move this stage's outputs, and those of the stages that read from it, to RUN_DIR/.old/ "
                   "and run them again (repeatable)")
    p.add_argument("--plan", action="store_true", help="only show what each stage would do, run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from cai.pipeline import load_pipeline, plan, restart, run_pipeline, stage
    from cai.yamlio import parse_override

    pipeline = load_pipeline(args.pipeline, dict(parse_override(s) for s in args.sets))
    for name in [*args.restart, *([args.until] if args.until else [])]:
        stage(name)  # an unknown stage name is an error before anything runs, --plan included
    if args.plan:
        items = plan(pipeline)
        stop = [i.stage for i in items].index(args.until) + 1 if args.until else len(items)
        for item in items[:stop]:
            print(f"{item.stage:<11} {item.status:<9} {item.detail}")
        return 0
    if args.restart:
        moved = restart(pipeline, args.restart)
        print(f"moved aside: {', '.join(moved)}")
    results = run_pipeline(pipeline, until=args.until, progress=not args.quiet)
    print("\nstage        this run   all runs")
    for r in results:
        print(f"{r.stage:<11} {r.wall_s:>8.1f}s {r.total_wall_s:>9.1f}s  {r.status}")
    print(f"total       {sum(r.wall_s for r in results):>8.1f}s {sum(r.total_wall_s for r in results):>9.1f}s")
    print(f"\nreport: cai report {pipeline.config.run_dir}")
    return 0
