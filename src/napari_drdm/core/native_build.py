"""Building and loading the compiled CPU kernels of :mod:`~napari_drdm.core.native`.

The C source (``_native/kernels.c``) is compiled once per machine type with the system C
compiler (``$CC`` or ``cc``) and OpenMP into ``~/.cache/napari-drdm`` (``$NAPARI_DRDM_CACHE`` to
move it) and loaded with :mod:`ctypes`: no Python headers, no PyTorch headers, ~1 s.  The
instruction set is PyTorch's CPU kernel level here: AVX-512F convolution tiles where PyTorch runs
AVX512 kernels, AVX2/FMA where it runs AVX2, plain C loops elsewhere (:data:`SIMD_LEVELS`).  Where there
is no compiler (or ``NAPARI_DRDM_NATIVE=0``), :func:`load` returns ``None``, says why in
:func:`status`, and the engine keeps its oneDNN path.  :func:`auto_enabled` is the CPU-flag rule
for using the kernels unasked when the path is not measured.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import environment

__all__ = ["load", "status", "cpu_capability", "auto_enabled", "build_library", "SIMD_LEVELS", "simd_level"]

#: the builds, by the value of the library's ``drdm_kernels_simd()``: extra compiler flags and a name
SIMD_LEVELS = {0: ("", [], "portable C"), 1: ("avx2", ["-mavx2", "-mfma"], "AVX2/FMA"),
               2: ("avx512", ["-mavx2", "-mfma", "-mavx512f"], "AVX-512F")}

_ABI = 2
_SOURCE = Path(__file__).with_name("_native") / "kernels.c"

_lock = threading.Lock()
_state: Dict[str, object] = {"lib": None, "tried": False, "reason": "not tried yet", "path": None}


def cpu_capability() -> str:
    """PyTorch's CPU kernel level here ("AVX2", "AVX512", "DEFAULT", ...; "" if unknown)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - old PyTorch
        return ""


def simd_level() -> int:
    """The build this CPU gets (a key of :data:`SIMD_LEVELS`): 2 where PyTorch runs AVX512 kernels
    (the CPU has AVX-512F and PyTorch chose to use it), 1 where it runs AVX2, else 0."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 0
    cap = cpu_capability()
    return 2 if cap.startswith("AVX512") else 1 if cap.startswith("AVX2") else 0


def _cache_dir() -> Path:
    env = environment.get("CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-drdm"


def _compiler() -> Optional[str]:
    for cand in (os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _flags(level: int) -> List[str]:
    return ["-O3", "-fPIC", "-shared", "-std=gnu11", "-fopenmp"] + SIMD_LEVELS[level][1]


def status() -> str:
    """Why the native kernels are or are not in use (for the benchmark's environment record)."""
    if environment.flag("NATIVE") is False:
        return "disabled by NAPARI_DRDM_NATIVE=0"
    return str(_state["reason"])


def _build(cc: str, level: int, out_dir: Optional[Path] = None) -> Path:
    src = _SOURCE.read_bytes()
    flags = _flags(level)
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError):
        ver = []
    key = hashlib.sha256(src + repr((flags, ver, platform.machine(), _ABI)).encode()).hexdigest()[:16]
    suffix = SIMD_LEVELS[level][0]
    name = f"drdm_kernels_{key}{'_' + suffix if suffix else ''}.so"
    dirs = [Path(out_dir)] if out_dir is not None else [
        _cache_dir(), Path(tempfile.gettempdir()) / f"napari-drdm-{getattr(os, 'getuid', lambda: 0)()}"]
    for d in dirs:
        if (d / name).exists():
            return d / name
    for i, d in enumerate(dirs):              # the cache, or a private temporary folder if it is read-only
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=d)
            break
        except OSError:
            if i == len(dirs) - 1:
                raise
    os.close(fd)
    target = d / name
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(proc.stderr or proc.stdout).strip()[:500]}")
        os.replace(tmp, target)             # atomic: concurrent builders never see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(lib):
    vp, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.drdm_conv.argtypes = [i, vp, i, i, i, vp, i, i, i, i, i, i, vp, vp, i, vp, vp, f, i]
    lib.drdm_instnorm_leaky.argtypes = [i, vp, i, i, i, i, i, i, vp, vp, f, vp, f, i]
    lib.drdm_planes_add.argtypes = [i, vp, i, i, vp, i, i, i, i, i, i, i, vp, i, i]
    lib.drdm_nhwc_to_planes.argtypes = [i, vp, i, vp, i, i, i, i, i, i, i, vp, i, i]
    lib.drdm_planes_to_nhwc.argtypes = [i, vp, i, i, vp, i, i, i, i, i]
    for name in ("drdm_conv", "drdm_instnorm_leaky", "drdm_planes_add", "drdm_nhwc_to_planes",
                 "drdm_planes_to_nhwc"):
        getattr(lib, name).restype = None
    return lib


def build_library(simd=None, cache_dir: Optional[Path] = None, cc: Optional[str] = None):
    """Compile (or reuse) the kernel library and load it: a separate handle each call (tests use
    this for the portable and the AVX2 build); raises on failure.  The engine uses :func:`load`.

    Args:
        simd: None or True: this CPU's build (:func:`simd_level`); False: portable C; an int
            (a key of :data:`SIMD_LEVELS`, at most this CPU's level): that build.
    """
    cc = cc or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    if simd is None or simd is True:
        level = simd_level()
    elif simd is False:
        level = 0
    else:
        level = int(simd)
        if level not in SIMD_LEVELS or level > simd_level():
            raise ValueError(f"simd={simd!r}: expected one of 0..{simd_level()} on this CPU (see SIMD_LEVELS)")
    path = _build(cc, level, cache_dir)
    lib = _bind(ctypes.CDLL(str(path)))
    if lib.drdm_kernels_abi() != _ABI:
        raise RuntimeError(f"stale kernel library {path} (ABI mismatch)")
    return lib


def load():
    """The compiled kernel library (ctypes), or None (see :func:`status`).  Built once per process.

    ``NAPARI_DRDM_NATIVE=0`` is read at every call and not remembered: a process that sets it for
    a while (a test, a benchmark's forced path) gets the library again once it is unset.
    """
    if environment.flag("NATIVE") is False:
        return None
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        _state["tried"] = True
        if sys.platform == "win32":
            _state["reason"] = "not built on Windows (oneDNN path used)"
            return None
        cc = _compiler()
        if cc is None:
            _state["reason"] = "no C compiler found (set CC); oneDNN path used"
            return None
        lib, errors = None, []
        for level in range(simd_level(), -1, -1):      # a compiler too old for AVX-512: the AVX2 build
            try:
                lib = build_library(simd=level, cc=cc)
                break
            except Exception as exc:  # compiler without OpenMP or the ISA flags, read-only cache, ...
                errors.append(f"{SIMD_LEVELS[level][2]}: {exc}")
        if lib is None:
            _state["reason"] = f"build failed ({'; '.join(errors)}); oneDNN path used"
            return None
        _state["lib"], _state["path"] = lib, lib._name
        _state["reason"] = (f"native kernels built ({SIMD_LEVELS[lib.drdm_kernels_simd()][2]}; "
                            f"{Path(lib._name).name})")
        return lib


def auto_enabled() -> Tuple[bool, str]:
    """The CPU-flag rule: whether engines would use the kernels unasked (``native=None``) without
    measuring (``NAPARI_DRDM_AUTOTUNE=0``; otherwise :mod:`~napari_drdm.core.autotune` decides per
    shape by timing both paths), and why not.

    Only where they were measured faster than oneDNN on the project's first machine: the AVX2/FMA
    build on CPUs whose best PyTorch kernels are AVX2 (on AVX-512 CPUs oneDNN's vectors are twice as
    wide; the AVX-512 build, issue 15, is left to the measurement; the portable C build was not timed
    against it).  ``NAPARI_DRDM_NATIVE=1`` (or ``native=True``) turns them on
    anyway, ``NAPARI_DRDM_NATIVE=0`` off everywhere."""
    if environment.flag("NATIVE") is True:
        return load() is not None, "forced on by NAPARI_DRDM_NATIVE=1"
    lib = load()
    if lib is None:
        return False, status()
    if not lib.drdm_kernels_simd():
        return False, "portable C build, not measured against oneDNN (native=True or NAPARI_DRDM_NATIVE=1 to use it)"
    cap = cpu_capability() or "unknown"
    if cap != "AVX2":
        return False, (f"measured faster than oneDNN on AVX2 CPUs; this one runs {cap} kernels "
                       "(native=True or NAPARI_DRDM_NATIVE=1 to use them)")
    return True, "in use by default (AVX2/FMA CPU)"
