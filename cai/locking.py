"""One writer per output: an exclusive `fcntl.flock` on a lock file, held for as long as the writer runs.

Why flock: the kernel drops the lock when the holding process dies (kill -9 included), so a lock
left behind by a dead process never blocks the next run; there is no stale-pid guessing. The lock
file records who holds it (pid, host, start time, command) only to write a useful error message.

Two processes appending to the same JSONL would each skip only the ids *they* saw at start and
write the rest twice; the lock makes the second one stop at once instead.

A lock file is removed when released. A process that opened the file just before it was removed
could lock the removed inode, so after locking we check that the path still names the file we
locked, and retry if not. Locks are advisory and local: two machines sharing an NFS folder are
protected only where the NFS server supports flock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from cai.errors import CaiError


class InUseError(CaiError):
    """Another live process holds the lock on an output file or a run directory."""


class Lock:
    """An exclusive lock on `target`, held until `release()` (or the process ends)."""

    def __init__(self, target: str | Path, lock_file: Path) -> None:
        self.target = Path(target)
        self.path = lock_file
        self._fd: int | None = None

    def acquire(self) -> Lock:
        """Take the lock or raise `InUseError` naming the holder; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise CaiError(
                    f"{self.target}: cannot create its lock file {self.path} ({e.strerror}). Write the output to a "
                    "folder you can write to, or fix this folder's permissions."
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise InUseError(self._busy_message()) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file while we opened it: lock the new one
        self._fd = fd
        _write_holder(fd)
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (removal first, so no one locks a file about to vanish)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def _busy_message(self) -> str:
        holder = read_holder(self.path)
        for _ in range(50):  # the holder may have locked the file a moment ago and not written its pid yet
            if _alive(holder):
                break
            time.sleep(0.01)
            holder = read_holder(self.path)
        who = f"pid {holder.get('pid', '?')}" if holder else "another process"
        if holder.get("host") and holder["host"] != socket.gethostname():
            who += f" on {holder['host']}"
        started = f" (started {holder['started']})" if holder.get("started") else ""
        return (
            f"{self.target} is already in use by {who}{started}: only one process may write it at a time. "
            f"Wait for it or stop it, then rerun this command to resume; or choose another output path. "
            f"(The lock is {self.path}; the system drops it when that process ends.)"
        )

    def __del__(self) -> None:  # a holder dropped without release() must not keep the lock
        try:
            self.release()
        except (OSError, TypeError):  # at interpreter exit; the kernel drops the lock anyway
            pass


def lock_output(path: str | Path) -> Lock:
    """Lock an output file (through `<file>.lock` beside it); raises `InUseError` if another process holds it."""
    p = Path(path)
    return Lock(p, p.with_name(p.name + ".lock")).acquire()


def check_free(path: str | Path) -> None:
    """Raise `InUseError` now if another process writes the output `path`: a stage calls this
    before minutes of model loading. The store's own lock is what guarantees one writer."""
    lock_output(path).release()


def lock_run_dir(run_dir: str | Path) -> Lock:
    """Lock a training run directory (through `<dir>/.cai.lock`, creating the directory); raises
    `InUseError` if another process holds it. Under `accelerate launch` only the main process locks."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    return Lock(d, d / ".cai.lock").acquire()


_HELD_RUN_DIRS: dict[Path, Lock] = {}


def hold_run_dir(run_dir: str | Path) -> None:
    """Lock a trainer's run directory for the rest of this process (see `lock_run_dir`).

    Why for the whole process: a trainer has no single exit point to release from (an exception may
    leave it anywhere), and the kernel drops the lock when the process ends. Holding it again from the
    same process is a no-op, so `cai run` and tests can resume a run in the process that started it."""
    d = Path(run_dir).resolve()
    if d not in _HELD_RUN_DIRS:
        _HELD_RUN_DIRS[d] = lock_run_dir(d)


def read_holder(lock_file: Path) -> dict[str, object]:
    """What the holder wrote into the lock file ({} if nothing readable yet)."""
    try:
        data = json.loads(lock_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_holder(fd: int) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv)[:500],
    }
    data = json.dumps(info).encode("utf-8")
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    except OSError:  # a full disk: the lock holds all the same, only the message loses its pid
        pass


def _alive(holder: dict[str, object]) -> bool:
    """Whether `holder` names a running process (one on another host is taken as running)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
