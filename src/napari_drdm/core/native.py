"""Native CPU kernels for the 2D network's two finest levels (optional, built on first use).

The 2D network spends most of a pass in its 10- and 20-channel layers at full and half
resolution.  oneDNN's AVX2 convolutions compute output channels in blocks of 8, so 10 channels
cost 16 and 20 cost 24.  ``_native/kernels.c`` vectorises over the image width instead and
fuses bias, LeakyReLU, the residual add and instance normalisation around the convolutions;
:func:`body2d` runs the network with those kernels for the levels at full and half resolution
and oneDNN (through :class:`~napari_drdm.core.fast.InferenceEngine`) for the rest.  Same
numbers up to float rounding (other summation orders).

Building: the C source is compiled once per machine type with the system C compiler (``$CC``
or ``cc``) and OpenMP into ``~/.cache/napari-drdm`` (``$NAPARI_DRDM_CACHE`` to move it) and
loaded with :mod:`ctypes`: no Python headers, no PyTorch headers, ~1 s.  Where there is no
compiler (or ``NAPARI_DRDM_NATIVE=0``), :func:`load` returns ``None``, says why in
:func:`status`, and the engine keeps its oneDNN path.
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

__all__ = ["load", "status", "auto_enabled", "build_library", "pack_conv3x3", "PAD", "body2d", "supports", "Planes", "Runner"]

PAD = 3                      # border of every plane buffer: the largest dilation of the 3x3 convolutions
SLACK = 16                   # floats after the last plane (vector loads of the last row)
MODE_STORE, MODE_LEAKY, MODE_RES_LEAKY, MODE_STORE_AND_LEAKY = 0, 1, 2, 3
_ABI = 1
_SOURCE = Path(__file__).with_name("_native") / "kernels.c"

_lock = threading.Lock()
_state: Dict[str, object] = {"lib": None, "tried": False, "reason": "not tried yet", "path": None}


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        cap = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - old PyTorch
        return False
    return cap.startswith("AVX2") or cap.startswith("AVX512")


def _cache_dir() -> Path:
    env = os.environ.get("NAPARI_DRDM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-drdm"


def _compiler() -> Optional[str]:
    for cand in (os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _flags(simd: bool) -> List[str]:
    f = ["-O3", "-fPIC", "-shared", "-std=gnu11", "-fopenmp"]
    if simd:
        f += ["-mavx2", "-mfma"]
    return f


def status() -> str:
    """Why the native kernels are or are not in use (for the benchmark's environment record)."""
    return str(_state["reason"])


def _build(cc: str, simd: bool, out_dir: Optional[Path] = None) -> Path:
    src = _SOURCE.read_bytes()
    flags = _flags(simd)
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError):
        ver = []
    key = hashlib.sha256(src + repr((flags, ver, platform.machine(), _ABI)).encode()).hexdigest()[:16]
    out_dir = Path(out_dir) if out_dir is not None else _cache_dir()
    target = out_dir / f"drdm_kernels_{key}{'_avx2' if simd else ''}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
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
    lib.drdm_conv3x3.argtypes = [vp, i, i, i, vp, i, i, i, i, i, vp, vp, i, vp, vp, f, i]
    lib.drdm_instnorm_leaky.argtypes = [vp, i, i, i, i, i, vp, vp, f, vp, f, i]
    lib.drdm_planes_add.argtypes = [vp, i, i, vp, i, i, i, i, i, i, vp, i, i]
    lib.drdm_nhwc_to_planes.argtypes = [vp, i, vp, i, i, i, i, i, i, vp, i, i]
    lib.drdm_planes_to_nhwc.argtypes = [vp, i, i, vp, i, i, i, i]
    for name in ("drdm_conv3x3", "drdm_instnorm_leaky", "drdm_planes_add", "drdm_nhwc_to_planes",
                 "drdm_planes_to_nhwc"):
        getattr(lib, name).restype = None
    return lib


def build_library(simd: Optional[bool] = None, cache_dir: Optional[Path] = None, cc: Optional[str] = None):
    """Compile (or reuse) the kernel library and load it: a separate handle each call (tests use
    this for the portable build); raises on failure.  The engine uses :func:`load`."""
    cc = cc or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    path = _build(cc, _cpu_has_avx2_fma() if simd is None else bool(simd), cache_dir)
    lib = _bind(ctypes.CDLL(str(path)))
    if lib.drdm_kernels_abi() != _ABI:
        raise RuntimeError(f"stale kernel library {path} (ABI mismatch)")
    return lib


def load():
    """The compiled kernel library (ctypes), or None (see :func:`status`).  Built once per process."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        _state["tried"] = True
        if os.environ.get("NAPARI_DRDM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _state["reason"] = "disabled by NAPARI_DRDM_NATIVE=0"
            return None
        if sys.platform == "win32":
            _state["reason"] = "not built on Windows (oneDNN path used)"
            return None
        cc = _compiler()
        if cc is None:
            _state["reason"] = "no C compiler found (set CC); oneDNN path used"
            return None
        try:
            lib = build_library(cc=cc)
        except Exception as exc:  # compiler without OpenMP, read-only cache, ...
            _state["reason"] = f"build failed ({exc}); oneDNN path used"
            return None
        _state["lib"], _state["path"] = lib, lib._name
        _state["reason"] = (f"native kernels built ({'AVX2/FMA' if lib.drdm_kernels_simd() else 'portable C'}; "
                            f"{Path(lib._name).name})")
        return lib


def auto_enabled() -> Tuple[bool, str]:
    """Whether engines use the kernels unasked (``native=None``), and why not.

    Only where they were measured faster than oneDNN: the AVX2/FMA build on CPUs whose best
    PyTorch kernels are AVX2 (on AVX-512 CPUs oneDNN's vectors are twice as wide; the portable C
    build was not timed against it).  ``NAPARI_DRDM_NATIVE=1`` (or ``native=True``) turns them on
    anyway, ``NAPARI_DRDM_NATIVE=0`` off everywhere."""
    if os.environ.get("NAPARI_DRDM_NATIVE", "").strip().lower() in ("1", "on", "true", "yes"):
        return load() is not None, "forced on by NAPARI_DRDM_NATIVE=1"
    lib = load()
    if lib is None:
        return False, status()
    if not lib.drdm_kernels_simd():
        return False, "portable C build, not measured against oneDNN (native=True or NAPARI_DRDM_NATIVE=1 to use it)"
    try:
        cap = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - old PyTorch
        cap = "unknown"
    if cap != "AVX2":
        return False, (f"measured faster than oneDNN on AVX2 CPUs; this one runs {cap} kernels "
                       "(native=True or NAPARI_DRDM_NATIVE=1 to use them)")
    return True, "in use by default (AVX2/FMA CPU)"


# ---------------------------------------------------------------------------- weights and buffers
def pack_conv3x3(w: torch.Tensor, b: Optional[torch.Tensor], cout: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Cout, Cin, 3, 3) weights -> blocks of 5 output channels, each laid out [ci][ky][kx][j]."""
    w = w[:cout].detach().float().contiguous()
    blocks = [w[s:s + 5].permute(1, 2, 3, 0).reshape(-1) for s in range(0, cout, 5)]
    bias = (b[:cout].detach().float() if b is not None else torch.zeros(cout)).contiguous()
    return torch.cat(blocks).contiguous(), bias


def supports(m) -> bool:
    """True for a 3x3, stride-1 convolution with padding = dilation <= PAD and no groups."""
    import torch.nn as nn
    return (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3) and tuple(m.stride) == (1, 1)
            and m.groups == 1 and m.padding_mode == "zeros" and m.dilation[0] == m.dilation[1]
            and tuple(m.padding) == tuple(m.dilation) and m.dilation[0] <= PAD)


class Planes:
    """A (B, C, H, W) float32 image stored as zero-bordered planes (see kernels.c)."""

    __slots__ = ("buf", "B", "C", "H", "W")

    def __init__(self, buf: torch.Tensor, B: int, C: int, H: int, W: int):
        self.buf, self.B, self.C, self.H, self.W = buf, B, C, H, W

    @property
    def ptr(self) -> int:
        return self.buf.data_ptr()

    def dense(self) -> torch.Tensor:
        """A (B, C, H, W) copy without the border (tests, debugging)."""
        P = PAD
        v = self.buf[: self.B * self.C * (self.H + 2 * P) * (self.W + 2 * P)]
        return v.view(self.B, self.C, self.H + 2 * P, self.W + 2 * P)[:, :, P:P + self.H, P:P + self.W].clone()


class Runner:
    """Per-engine state of the native path: packed weights and a pool of plane buffers."""

    def __init__(self, lib):
        self.lib = lib
        self.weights: Dict[str, Tuple[torch.Tensor, torch.Tensor, int, int, int]] = {}
        self.pool: Dict[tuple, List[torch.Tensor]] = {}
        self.pool_key = None

    def reset(self):
        self.weights = {}
        self.pool = {}

    def planes(self, B, C, H, W) -> Planes:
        key = (B, C, H, W)
        lst = self.pool.get(key)
        if lst:
            return Planes(lst.pop(), B, C, H, W)
        n = B * C * (H + 2 * PAD) * (W + 2 * PAD) + SLACK
        return Planes(torch.zeros(n), B, C, H, W)        # zero borders, never written

    def free(self, *ps: Planes):
        for p in ps:
            lst = self.pool.setdefault((p.B, p.C, p.H, p.W), [])
            if len(lst) < 6:
                lst.append(p.buf)

    def packed(self, eng, name: str):
        """(packed weights, bias, Cout, Cin, dilation) of one of the engine's 3x3 convolutions."""
        got = self.weights.get(name)
        if got is None:
            c = eng._convs[name]
            wp, bp = pack_conv3x3(c.w, c.b, c.cout)
            got = self.weights[name] = (wp, bp, c.cout, int(c.w.shape[1]), int(c.dilation[0]))
        return got

    def norm(self, eng, name: str):
        got = self.weights.get(name)
        if got is None:
            g, b, eps = eng._norms[name]
            got = self.weights[name] = (g.detach().float().contiguous(), b.detach().float().contiguous(), eps)
        return got

    def conv(self, eng, name: str, src: Planes, mode: int, out: Optional[Planes] = None,
             res: Optional[Planes] = None, out2: Optional[Planes] = None, threads: int = 1) -> Planes:
        wp, bp, cout, cin, dil = self.packed(eng, name)
        if cin != src.C:
            raise ValueError(f"{name}: expected {cin} input channels, got {src.C}")
        if out is None:
            out = self.planes(src.B, cout, src.H, src.W)
        self.lib.drdm_conv3x3(src.ptr, src.B, cin, PAD, out.ptr, cout, PAD, src.H, src.W, dil, wp.data_ptr(),
                              bp.data_ptr(), mode, res.ptr if res is not None else None,
                              out2.ptr if out2 is not None else None, eng.slope, threads)
        return out


def _add_vec(e: torch.Tensor, uniform: bool, lo: int, hi: int) -> Tuple[torch.Tensor, int]:
    """Embedding slice as a contiguous float32 array and its per-sample stride (0 = shared)."""
    if uniform:
        return e[lo:hi].float().contiguous(), 0
    return e[:, lo:hi].float().contiguous(), hi - lo


def _block(runner: Runner, eng, p: str, h: Planes, norm: bool, threads: int) -> Planes:
    """One ACNN-II block on planes: r = conv0(h) [-> instance norm]; a = act(r);
    f = act(convs0(a)); r <- act(convs1(f) + r).  h is freed."""
    lib = runner.lib
    if norm:
        r = runner.conv(eng, p + ".conv0", h, MODE_STORE, threads=threads)
        runner.free(h)
        a = runner.planes(r.B, r.C, r.H, r.W)
        g, bt, eps = runner.norm(eng, p + ".ln")
        lib.drdm_instnorm_leaky(r.ptr, r.B, r.C, PAD, r.H, r.W, g.data_ptr(), bt.data_ptr(), eps, a.ptr,
                                eng.slope, threads)
    else:
        a = runner.planes(h.B, eng._convs[p + ".conv0"].cout, h.H, h.W)
        r = runner.conv(eng, p + ".conv0", h, MODE_STORE_AND_LEAKY, out2=a, threads=threads)
        runner.free(h)
    f = runner.conv(eng, p + ".convs.0", a, MODE_LEAKY, threads=threads)
    runner.free(a)
    runner.conv(eng, p + ".convs.1", f, MODE_RES_LEAKY, out=r, res=r, threads=threads)
    runner.free(f)
    return r


def _stage(runner, eng, name, h, norm, threads) -> Planes:
    for i in range(3):
        h = _block(runner, eng, f"{name}.{i}", h, norm, threads)
    return h


def _to_nhwc(runner, eng, p: Planes, like: torch.Tensor, threads: int) -> torch.Tensor:
    out = eng._alloc((p.B, p.C, p.H, p.W), like)            # channels-last work tensor
    runner.lib.drdm_planes_to_nhwc(p.ptr, PAD, p.C, out.data_ptr(), p.B, p.H, p.W, threads)
    return out


def _nhwc_into(runner, t: torch.Tensor, dst: Planes, c0: int, add: Optional[Tuple[torch.Tensor, int]],
               threads: int):
    if not t.is_contiguous(memory_format=torch.channels_last):
        t = t.contiguous(memory_format=torch.channels_last)
    B, C, H, W = t.shape
    runner.lib.drdm_nhwc_to_planes(t.data_ptr(), C, dst.ptr, PAD, dst.C, c0, B, H, W,
                                   add[0].data_ptr() if add is not None else None, add[1] if add else 0, threads)


def _up_cat(runner, eng, name, skip: Planes, h: torch.Tensor, e, uniform, threads) -> Planes:
    """cat([skip, up(h)]) + e as planes (skip and h are freed)."""
    c = eng._convs[name]
    cs = skip.C
    if uniform and c.b is not None:
        up, add_up = eng._conv(h, c, bias=c.b + e[cs:]), None      # embedding folded into the bias
    else:
        up, add_up = eng._conv(h, c), _add_vec(e, uniform, cs, e.shape[-1])
    eng._free(h)
    out = runner.planes(skip.B, cs + up.shape[1], skip.H, skip.W)
    es, st = _add_vec(e, uniform, 0, cs)
    runner.lib.drdm_planes_add(skip.ptr, PAD, cs, out.ptr, PAD, out.C, 0, skip.B, skip.H, skip.W, es.data_ptr(), st,
                               threads)
    _nhwc_into(runner, up, out, cs, add_up, threads)
    runner.free(skip)
    return out


def body2d(eng, x: torch.Tensor, t, runner: Runner, threads: int) -> torch.Tensor:
    """The 2D U-Net up to its last convolution (raw output, a dense (B, d, H, W) tensor):
    levels 1-2 (b1, b2, b5, b_out, conv_out) in native kernels, the rest through ``eng``."""
    lib = runner.lib
    E, uni = eng._embeddings(t, x.device)
    e1, e2, e3, emid, e4, e5, eout = E
    B, Cin, H, W = x.shape
    xc = x.float().contiguous()
    X = runner.planes(B, Cin, H, W)
    a1, s1 = _add_vec(e1, uni, 0, Cin)
    lib.drdm_planes_add(xc.data_ptr(), 0, Cin, X.ptr, PAD, Cin, 0, B, H, W, a1.data_ptr(), s1, threads)
    h1 = _stage(runner, eng, "b1", X, True, threads)

    n1 = _to_nhwc(runner, eng, h1, xc, threads)
    d = eng._down("down1", n1, e2, uni)
    eng._free(n1)
    X2 = runner.planes(B, d.shape[1], d.shape[2], d.shape[3])
    _nhwc_into(runner, d, X2, 0, None, threads)
    eng._free(d)
    h2 = _stage(runner, eng, "b2", X2, True, threads)

    n2 = _to_nhwc(runner, eng, h2, xc, threads)
    h3 = eng._stage("b3", eng._down("down2", n2, e3, uni), True)
    eng._free(n2)
    h = eng._conv(h3, eng._convs["down3"]).mul_(eng._bc(emid, uni))
    h = eng._stage("b_mid", h, True)
    h = eng._stage("b4", eng._up_cat("up1", h3, h, e4, uni), False)

    h = _stage(runner, eng, "b5", _up_cat(runner, eng, "up2", h2, h, e5, uni, threads), False, threads)
    n = _to_nhwc(runner, eng, h, xc, threads)
    runner.free(h)
    h = _stage(runner, eng, "b_out", _up_cat(runner, eng, "up3", h1, n, eout, uni, threads), False, threads)

    c = eng._convs["conv_out"]
    wp, bp, cout, cin, dil = runner.packed(eng, "conv_out")
    u = torch.empty((B, cout, H, W), dtype=torch.float32)
    lib.drdm_conv3x3(h.ptr, B, cin, PAD, u.data_ptr(), cout, 0, H, W, dil, wp.data_ptr(), bp.data_ptr(),
                     MODE_STORE, None, None, eng.slope, threads)
    runner.free(h)
    return u if c.w.dtype == torch.float32 else u.to(c.w.dtype)
