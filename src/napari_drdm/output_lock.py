"""One writer per output folder: an OS lock on ``OUT/.drdm.lock`` held while a command writes into OUT.

Sharded runs share the folder lock and hold their shard's lock exclusively.  A refused writer is
told which process holds the folder.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

from .errors import DRDMError
from .paths import shown

__all__ = ["LOCK_FILE", "OutputLock", "OutputLockedError", "pid_alive"]

LOCK_FILE = ".drdm.lock"


class OutputLockedError(DRDMError, FileExistsError):
    """Another process is writing into the same output folder."""


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one we may not signal counts as alive).

    Args:
        pid: the process id.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class OutputLock:
    """An exclusive OS lock on ``OUT/.drdm.lock`` (``flock``), held while a command writes into OUT.

    The operating system releases it when the process ends, however it ends (even ``kill -9``),
    so a lock file left behind by a dead process is stale and simply taken over; the file records
    the holder's pid and command so that a refused second writer can say who holds it.  A
    sharded run takes the folder lock shared and its shard's lock exclusively, so shards of one
    run may write together but not alongside an unsharded run or a second copy of the same shard.
    Without ``fcntl`` (Windows) an ``O_EXCL`` lock file with a pid is used instead; a file whose
    pid is no longer running is stale and removed.

    Args:
        out_dir: the output folder (created if missing).
        shard: ``(i, n)`` for sharded runs.
        wait: seconds to wait for the lock before refusing (0: refuse at once).
        what: the command, recorded in the lock file.
    """

    def __init__(self, out_dir, shard=(0, 1), wait: float = 0.0, what: str = "drdm"):
        self.out = Path(out_dir)
        self.shard = tuple(shard)
        self.wait = float(wait)
        self.what = what
        self._files = []
        self.stale: Optional[str] = None

    def _paths(self):
        i, n = self.shard
        if n > 1:
            return [(self.out / LOCK_FILE, True), (self.out / f".drdm-shard-{i}-of-{n}.lock", False)]
        return [(self.out / LOCK_FILE, False)]

    def __enter__(self):
        import time
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create the output folder {shown(self.out)}: {e.strerror}") from None
        if not self.out.is_dir():
            raise NotADirectoryError(f"output folder {shown(self.out)} is not a folder")
        deadline = time.monotonic() + self.wait
        for path, shared in self._paths():
            while True:
                ok, holder = self._take(path, shared)
                if ok:
                    break
                if time.monotonic() >= deadline:
                    self.release()
                    who = f" ({holder})" if holder else ""
                    raise OutputLockedError(f"another drdm process{who} is writing into {shown(self.out)}; wait for it "
                                            f"to finish or use another output folder (lock file {path.name})")
                time.sleep(0.2)
        return self

    def _take(self, path: Path, shared: bool):
        try:
            import fcntl
        except ImportError:     # pragma: no cover - Windows
            return self._take_excl_file(path)
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                f.close()
                raise
            f.seek(0)
            holder = f.read().strip()
            f.close()
            return False, holder
        f.seek(0)
        old = f.read().strip()
        if old and not shared:
            self.stale = old           # a previous holder ended without cleaning up: the OS released it
        if not shared:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}: {self.what}")
            f.flush()
        self._files.append((f, path, not shared))
        return True, ""

    def _take_excl_file(self, path: Path):  # pragma: no cover - Windows
        try:
            fd = os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            text = path.read_text(errors="replace").strip()
            try:
                pid = int(text.split()[1].rstrip(":"))
            except (IndexError, ValueError):
                pid = None
            if pid is not None and not pid_alive(pid):
                self.stale = text
                path.unlink(missing_ok=True)
                return self._take_excl_file(path)
            return False, text
        os.write(fd, f"pid {os.getpid()}: {self.what}".encode())
        os.close(fd)
        self._files.append((None, path, True))
        return True, ""

    def release(self):
        for f, path, mine in reversed(self._files):
            if f is None:                # pragma: no cover - Windows
                path.unlink(missing_ok=True)
                continue
            try:
                if mine:
                    f.seek(0)
                    f.truncate()
            except OSError:
                pass
            f.close()                    # closing drops the flock
        self._files = []

    def __exit__(self, *exc):
        self.release()
        return False
