"""Guards of the output side: confinement of writes to the output root, one writer per output
folder, checks of an output folder before any computation, checks of arrays before they are
written, and a memory estimate before work starts.

All messages are one line naming the file, folder or option concerned and what was expected.
"""
from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import DRDMError, InputError, OutputError

__all__ = ["UnsafePathError", "OutputLockedError", "OutputError", "confine", "OutputLock", "check_output_dir",
           "writable_array", "check_finite", "check_label_values", "shown", "check_utf8_name",
           "available_memory", "estimate_export_bytes", "check_memory", "pid_alive", "LOCK_FILE"]

LOCK_FILE = ".drdm.lock"


class UnsafePathError(DRDMError, ValueError):
    """A write target outside the output root (absolute path, ``..``, a symlink pointing out).

    Not an :class:`OutputError`: an export skips an input whose outputs cannot be written, but
    stops at a path that leaves the output folder."""


class OutputLockedError(DRDMError, FileExistsError):
    """Another process is writing into the same output folder."""


def shown(path) -> str:
    """A path printable on any terminal: bytes that are not UTF-8 appear as ``\\xNN``."""
    s = os.fspath(path)
    if isinstance(s, bytes):
        return s.decode("utf-8", "backslashreplace")
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_utf8_name(path) -> None:
    """Refuse a file name that is not valid UTF-8 (it could not be recorded in the JSON manifest).

    Args:
        path: the file.

    Raises:
        InputError: naming the file (undecodable bytes shown as ``\\xNN``).
    """
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{shown(path)}: the file name is not valid UTF-8; rename it") from None


# ---------------------------------------------------------------------------------- confinement
def confine(root, target) -> Path:
    """The absolute path of ``target`` if it lies inside ``root``, else refuse.

    Every output file is written through :func:`napari_drdm.io.atomic_write`, which calls this
    with the output root.

    Args:
        root: the output root folder (may not exist yet; symlinks in it are resolved).
        target: a path relative to ``root`` (or absolute but inside it). Absolute paths elsewhere,
            ``..`` components that leave ``root`` and symlinks (of folders or of the file itself)
            pointing outside ``root`` are refused.

    Returns:
        The resolved target path.

    Raises:
        UnsafePathError: naming the target and the root.
    """
    root_r = Path(os.path.abspath(root)).resolve()
    t = Path(target)
    full = t if t.is_absolute() else Path(root) / t
    resolved = Path(os.path.abspath(full)).resolve()
    try:
        resolved.relative_to(root_r)
    except ValueError:
        raise UnsafePathError(f"refusing to write {shown(target)}: it resolves to {shown(resolved)}, outside the "
                              f"output folder {shown(root_r)} (absolute paths, '..' and symlinks out are refused)") \
            from None
    if resolved == root_r:
        raise UnsafePathError(f"refusing to write {shown(target)}: it is the output folder itself")
    return resolved


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


# ---------------------------------------------------------------------------------- locking
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


def check_output_dir(out_dir, what: str = "output folder") -> Path:
    """Check, before any computation, that ``out_dir`` is (or can be made) a writable folder.

    A probe file is created and removed, which also catches read-only mounts and full disks.

    Args:
        out_dir: the folder (created if missing).
        what: how to name it in messages.

    Raises:
        NotADirectoryError / OSError: naming the folder and the reason.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{what} {shown(out)} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".drdm-write-test-{uuid.uuid4().hex}"
        with open(probe, "wb") as f:
            f.write(b"x")
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"{what} {shown(out)} is not writable: {e.strerror or e}") from None
    return out


# ---------------------------------------------------------------------------------- output arrays
def writable_array(arr, what: str) -> np.ndarray:
    """``arr`` in a dtype NIfTI holds exactly, or refuse.

    bool becomes uint8, float16 becomes float32 (exact), float128 becomes float64 when its
    values fit, int64/uint64 are narrowed to 32 bits when their values fit and otherwise kept
    (NIfTI has 64-bit integer codes).

    Args:
        arr: the array to be written.
        what: how to name it in messages (file and role).

    Raises:
        OutputError: complex, object or string data, or float128 values beyond float64.
    """
    a = np.asarray(arr)
    kind = a.dtype.kind
    if a.dtype == bool:
        return a.astype(np.uint8)
    if kind == "f":
        if a.dtype.itemsize < 4:
            return a.astype(np.float32)
        if a.dtype.itemsize > 8:
            b = a.astype(np.float64)
            if not np.array_equal(np.isfinite(a), np.isfinite(b)):
                raise OutputError(f"{what}: float{8 * a.dtype.itemsize} values beyond the float64 range cannot be "
                                  f"written to NIfTI")
            return b
        return a
    if kind in "iu":
        if a.dtype.itemsize == 8 and a.size:
            lo, hi = int(a.min()), int(a.max())
            for t in (np.int32, np.uint32):
                if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                    return a.astype(t)
        return a
    raise OutputError(f"{what}: dtype {a.dtype} cannot be written to NIfTI (expected real numbers)")


def check_finite(arr, what: str) -> None:
    """Refuse an output holding NaN or infinite values.

    Args:
        arr: the array.
        what: how to name it in messages.
    """
    a = np.asarray(arr)
    if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
        n = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise OutputError(f"{what}: {n} of {a.size} values are NaN or infinite; nothing was written")


def check_label_values(out_labels, allowed, what: str) -> None:
    """Refuse warped labels holding a value the input label map did not have.

    Args:
        out_labels: the warped label map.
        allowed: the input's label values (plus the background).
        what: how to name it in messages.
    """
    new = np.setdiff1d(np.unique(np.asarray(out_labels)), np.asarray(allowed))
    if new.size:
        raise OutputError(f"{what}: label values {new[:5].tolist()} are not in the input label map; nothing "
                          f"was written")


# ---------------------------------------------------------------------------------- memory
def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable``; else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


#: bytes per voxel of the input grid: the input, its float32 copy, the field and the sampling grid
#: (d floats each), the warp temporaries, the output and its NIfTI layout
def _input_grid_bytes(n_vox: int, ndim: int, itemsize: int, labels: bool, inverse: bool, pairs: bool) -> int:
    per = itemsize + 4 * (3 + 4 * ndim)
    if labels:
        per += 8 * 3 + 4 * ndim          # int64 copies and the nearest-neighbour grid
    if inverse:
        per += 4 * 4 * ndim
    if pairs:
        per += 4 * (2 + 3 * ndim)        # composed field, fixed image
    return int(n_vox * per)


def estimate_export_bytes(shape: Sequence[int], itemsize: int, model_size: int, channels: Sequence[int],
                          batch: int, labels: bool = False, inverse: bool = False, pairs: bool = False,
                          frames: int = 0) -> dict:
    """Peak memory of generating one output of an image, split by what drives it.

    Args:
        shape: the input's spatial shape.
        itemsize: bytes per input voxel.
        model_size: the model's side S.
        channels: the network's channel widths.
        batch: samples per network pass.
        labels: a label map is warped too.
        inverse: the inverse field is computed.
        pairs: Algorithm 4 (a second field, a composed one and a fixed image).
        frames: frames kept (the explorer); each holds a field and an image on the input grid.

    Returns:
        ``{"input_grid": bytes, "model_grid": bytes, "frames": bytes, "total": bytes}``.
    """
    nd = len(shape)
    n_vox = int(np.prod([int(s) for s in shape], dtype=np.int64))
    inp = _input_grid_bytes(n_vox, nd, itemsize, labels, inverse, pairs)
    s_vox = int(model_size) ** nd
    # network activations (encoder + decoder, kept for the skips) + fields and their warps per sample
    per_sample = s_vox * 4 * (3 * sum(int(c) for c in channels) + 12 * nd + 8)
    model = int(per_sample * max(1, int(batch)))
    fr = int(frames) * n_vox * 4 * (nd + 1)
    return {"input_grid": inp, "model_grid": model, "frames": fr, "total": inp + model + fr}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_memory(est: dict, budget: int, what: str, batch: Optional[int] = None,
                 frames: Optional[int] = None) -> None:
    """Refuse before work when ``est`` (from :func:`estimate_export_bytes`) exceeds ``budget``.

    The message names the option that would fit: a smaller ``--batch``, fewer frames, or, when
    the input grid alone is too large, a downsampled input.

    Args:
        est: the estimate.
        budget: bytes available (``available_memory()`` or ``--max-memory``).
        what: the input, for the message.
        batch: the batch size used in ``est`` (to suggest a smaller one).
        frames: the number of frames kept in ``est`` (to suggest fewer).

    Raises:
        MemoryError: one line naming the input, the estimate, the budget and what to change.
    """
    if est["total"] <= budget:
        return
    fixed = est["input_grid"]
    hint = ""
    if batch and batch > 1:
        per = est["model_grid"] / batch
        fit = int((budget - fixed - est["frames"]) // per) if per else batch
        if 1 <= fit < batch:
            hint = f"; --batch {fit} would fit"
    if not hint and frames:
        per = est["frames"] / frames
        fit = int((budget - fixed - est["model_grid"]) // per) if per else frames
        if 0 <= fit < frames:
            hint = f"; keeping {fit} frames would fit"
    if not hint:
        if fixed + est["model_grid"] / max(1, batch or 1) > budget:
            hint = "; downsample or crop the image (or use a model with a smaller grid S) or use a machine " \
                   "with more memory"
        else:
            hint = "; use --batch 1"
    raise MemoryError(f"{what}: needs about {_gb(est['total'])} of memory (input grid {_gb(fixed)}, model grid "
                      f"{_gb(est['model_grid'])}{', frames ' + _gb(est['frames']) if est['frames'] else ''}) but "
                      f"{_gb(budget)} is available{hint}")
