"""`cai` command line: thin over the stages and trainers.

Each `cai/cli/cmd_*.py` module adds its own subcommand(s): it defines `GROUP` (None for a
top-level command, or "train" for `cai train ...`) and `register(subparsers)`, which adds a
parser whose default `func(args) -> int` runs the command. User errors (`CaiError`, and OS errors
such as a read-only folder or a full disk, see failures.py) print as one paragraph with a non-zero
exit code, never a traceback; `--debug` (alias `--traceback`) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from cai import __version__
from cai.cli.failures import describe_decode_error, describe_os_error
from cai.errors import CaiError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cai", description="Constitutional AI / RLAIF: data, labels, reward model, PPO."
    )
    parser.add_argument("--version", action="version", version=f"cai {__version__}")
    parser.add_argument("--debug", "--traceback", dest="traceback", action="store_true",
                        help="show the full traceback of an error instead of its one-paragraph message")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = top.add_parser("train", help="train a reward model, an SFT policy or a PPO policy")
    train_sub = train.add_subparsers(dest="train_command", metavar="TRAINER")
    groups = {None: top, "train": train_sub}
    package = importlib.import_module("cai.cli")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            module = importlib.import_module(f"cai.cli.{info.name}")
            module.register(groups[getattr(module, "GROUP", None)])
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except CaiError as e:
        if args.traceback:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if args.traceback:
            raise
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except UnicodeError as e:
        if args.traceback:
            raise
        print(f"error: {describe_decode_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rows written so far are kept; rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
