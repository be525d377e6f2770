"""`cai merge`: join the shard outputs of one `cai generate` / `cai label` run into one checked file."""

from __future__ import annotations

import argparse

GROUP = None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="join shard outputs (--shard i/n) of one stage run into one file, checking them",
        description="Join the outputs of one stage run split with --shard i/n (one per machine or GPU). Refuses parts "
        "written with different settings (their .meta.json fingerprints differ) and parts still being written; "
        "writes every id once, reports ids found twice, and refuses ids found twice with different content. "
        "Source rows that no part holds (checked against --input, else the input the parts' .meta.json record) "
        "make it exit non-zero unless --allow-incomplete. Writes OUT, OUT.meta.json and OUT.merge.json.",
    )
    p.add_argument("parts", nargs="+", metavar="PART", help="shard outputs (JSONL with their .meta.json)")
    p.add_argument("--out", required=True, help="merged output JSONL")
    p.add_argument("--input", default=None,
                   help="the prompts file of the `cai generate` run: every row of it must be in some part "
                   "(default: the input the parts' .meta.json record)")
    p.add_argument("--allow-incomplete", dest="allow_incomplete", action="store_true",
                   help="write the merge even when source rows are missing (still reported)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from cai.stages.merge import MergeConfig, merge_parts

    summary = merge_parts(MergeConfig(parts=args.parts, out=args.out, input=args.input,
                                      allow_incomplete=args.allow_incomplete, force=args.force))
    print(summary.render())
    return 0
