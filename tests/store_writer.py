"""A writer process for the store tests: opens a JsonlStore like a stage does and appends rows.

    python tests/store_writer.py OUT N [--hold] [--payload BYTES] [--every-ms MS]

Writes rows 0..N-1 (ids are content hashes, as in the stages), skipping ids already on disk, so
running it again resumes. Prints "open" once the store is open. With --hold it then waits for a
line on stdin before writing (so a test can start a second writer meanwhile). Exits 1 with the
one-paragraph error on a CaiError, as the CLI does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic import BaseModel

from cai.errors import CaiError
from cai.hashing import record_id
from cai.store import JsonlStore, SourcePlan


class Row(BaseModel):
    id: str
    source_index: int
    text: str


def make_row(i: int, payload: int) -> Row:
    text = (f"row {i} " * (payload // 6 + 1))[:payload]
    return Row(id=record_id(i, "writer"), source_index=i, text=text)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("n", type=int)
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--payload", type=int, default=20)
    ap.add_argument("--every-ms", type=float, default=0.0)
    args = ap.parse_args()
    try:
        store = JsonlStore(args.out, Row, stage="writer", config={"payload": args.payload},
                           source=SourcePlan(input="numbers", rows=args.n))
        print("open", flush=True)
        if args.hold:
            sys.stdin.readline()
        with store:
            for i in range(args.n):
                store.append(make_row(i, args.payload))
                if args.every_ms:
                    time.sleep(args.every_ms / 1000)
    except CaiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
