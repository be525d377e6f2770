"""`cai generate`: the critique-revise stage; `cai export`: stage output -> datasets/parquet."""

from __future__ import annotations

import argparse
from pathlib import Path

from cai.cli.config_args import EXECUTOR_FLAGS
from cai.stages.critique import CritiqueConfig
from cai.stages.flag_filter import FLAG_NAMES

GROUP = None

_FLAGS = {  # CLI flag -> (config field, type, help)
    "--prompts": ("prompts", str, "prompt file: JSONL with prompt/messages, HH transcripts, .json/.parquet/.csv"),
    "--constitution": ("constitution", str, "constitution YAML"),
    "--out": ("out", str, "output JSONL (append-only; rerun to resume)"),
    "--model": ("model", str, "local model dir or hub id (default: bundled Gemma 3 270M)"),
    "--engine": ("engine", str, "hf (default) or vllm"),
    "--rounds": ("rounds", int, "critique->revision rounds per prompt (default 4)"),
    "--max-new-tokens": ("max_new_tokens", int, "max tokens per response/revision (default 128)"),
    "--critique-max-new-tokens": ("critique_max_new_tokens", int, "max tokens per critique"),
    "--temperature": ("temperature", float, "sampling temperature (default 0.7; 0 = greedy)"),
    "--top-p": ("top_p", float, "nucleus sampling (default 0.95)"),
    "--batch-size": ("batch_size", int, "prompts per engine batch (default 16)"),
    "--seed": ("seed", int, "run seed (default 0)"),
    "--limit": ("limit", int, "only the first N prompts"),
    "--shard": ("shard", str, "i/n: this machine's share of the prompts"),
    **EXECUTOR_FLAGS,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="critique-revise red-team prompts into revised SFT data",
        description="Run a model through the constitution's principles (critique, then revise, several rounds) "
        "and write one JSONL row per prompt. Flags override the fields of --config.",
    )
    p.add_argument("--config", help="YAML config with the same fields (flags override it)")
    for flag, (dest, typ, help_) in _FLAGS.items():
        p.add_argument(flag, dest=dest, type=typ, help=help_, default=None)
    p.add_argument("--tag", dest="tags", action="append", help="only principles with this tag (repeatable)")
    p.add_argument("--engine-option", dest="engine_option", action="append", metavar="KEY=VALUE",
                   help="engine constructor option, e.g. tensor_parallel_size=2 or dtype=bfloat16 (repeatable)")
    p.add_argument("--without-replacement", dest="with_replacement", action="store_false", default=None,
                   help="never draw the same principle twice for one prompt")
    p.add_argument("--force", action="store_true", default=None, help="move an output written with another config aside")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_generate)

    e = sub.add_parser("export", help="export a stage output JSONL to datasets (save_to_disk + parquet)")
    e.add_argument("file", help="output of cai generate or cai label")
    e.add_argument("--out", required=True, help="directory for the exported tables")
    e.add_argument("--drop-flag", dest="drop_flags", action="append", default=[], metavar="FLAG",
                   choices=FLAG_NAMES, help="leave out rows carrying this flag, e.g. copied_few_shot (repeatable)")
    e.set_defaults(func=run_export)


def load_config(args: argparse.Namespace) -> CritiqueConfig:
    from cai.cli.config_args import config_from_args

    fields = [dest for dest, _, _ in _FLAGS.values()] + ["tags", "with_replacement", "force"]
    return config_from_args(args, CritiqueConfig, fields, ("prompts", "constitution", "out"), "cai generate")


def run_generate(args: argparse.Namespace) -> int:
    from cai.stages.critique import run_critique

    config = load_config(args)
    summary = run_critique(config, progress=not args.quiet)
    print(summary.render())
    return 0


def run_export(args: argparse.Namespace) -> int:
    from cai.stages.export import check_out_dir, export_tables_of, write_tables

    check_out_dir(Path(args.out))
    tables, dropped = export_tables_of(args.file, tuple(args.drop_flags))
    write_tables(tables, args.out)
    for name, rows in tables.items():
        print(f"{Path(args.out) / name}: {len(rows)} rows (and {name}.parquet)")
    if dropped:
        print("dropped: " + ", ".join(f"{why}={n}" for why, n in dropped.items()))
    return 0
