#!/usr/bin/env python
"""How fast DRDM generates: the optimised default path against plain eager PyTorch.

    python benchmarks/speed.py                       # 2D 128/256 and 3D 64/128, table on stdout
    python benchmarks/speed.py --json out.json       # also machine-readable (``--json -``: stdout)
    python benchmarks/speed.py --sizes 2d256 --repeats 9 --threads 2

Per size (batch 1 unless said otherwise; medians over ``--repeats`` interleaved runs, the
default path and the plain one taking turns so that a drifting machine affects both alike):

* ``network_pass_s``       one U-Net pass (the "bare network forward"), default path and plain;
* ``network_forward_s``    the network with its K = 2 recursions (two passes + two resamplings);
* ``reverse_step_s``       one reverse step of Algorithm 2 as ``recover`` runs it: network
                           (K passes), composition, image resampling;
* ``forward_sampler_s``    psi_{T':1} at T' = 45 (the compositions on the 64-grid, upsampling);
* ``generation_s``         a whole generation at T' = 45 (sampler + reverse loop) for both
                           loop lengths: ``paper`` (45 steps) and ``reference`` (80 steps).
                           2D: measured end to end; 3D: sampler + steps x median step time
                           (``generation_method`` says which);
* ``samples_per_s``        whole generations per second (default schedule) at batch 1 and at the
                           best of ``--batch-sizes``;
* ``peak_memory``          CPU: peak resident set size (ru_maxrss) of a separate process that
                           runs a generation with all frames rendered and dropped, and its growth
                           over the process after set-up; CUDA: torch.cuda.max_memory_allocated.

Top-level JSON keys ``overhead_ratio`` (reverse step / (K x network pass), default path, per size)
and ``speedup_vs_eager`` (plain eager float32 step / default-path step, batch 1, same run).

Weights: random initialisation (timing does not depend on them) unless ``--checkpoint`` gives a
file of the right dimension.  Only public tools are used (time.perf_counter, resource).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import napari_drdm  # noqa: E402  (before torch: its OpenMP wait policy, see napari_drdm/__init__.py)

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from napari_drdm.core import autotune  # noqa: E402
from napari_drdm.core import environment as settings_env  # noqa: E402
from napari_drdm.core import native_build as native_kernels  # noqa: E402
from napari_drdm.core.config import DRDMConfig  # noqa: E402
from napari_drdm.core.fast import InferenceEngine, mkldnn_fusion_available  # noqa: E402
from napari_drdm.core.forward import ForwardSampler  # noqa: E402
from napari_drdm.core.network import DRDMNet  # noqa: E402
from napari_drdm.core.recovery import recover, reverse_timesteps  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402

T_PRIME = 45
DEFAULT_SIZES = "2d128,2d256,3d64,3d128"


# ---------------------------------------------------------------------------- helpers
def parse_size(tag: str):
    tag = tag.strip().lower()
    if len(tag) < 3 or tag[0] not in "23" or tag[1] != "d" or not tag[2:].isdigit():
        raise argparse.ArgumentTypeError(f"size {tag!r}: expected e.g. 2d256 or 3d64")
    nd, S = int(tag[0]), int(tag[2:])
    if S % 8:
        raise argparse.ArgumentTypeError(f"size {tag!r}: the side must be divisible by 8")
    return tag, nd, S


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def med(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def summary(xs):
    xs = [float(x) for x in xs]
    return {"median": med(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None, "n": len(xs)}


def phantom(nd: int, S: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A smooth test image in [0, 1]: an ellipsoid with soft edges plus low-frequency texture."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, S) for _ in range(nd)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    radii = torch.tensor([0.7, 0.55, 0.6][:nd]).view(nd, *([1] * nd))
    r = ((grid / radii) ** 2).sum(0).sqrt()
    body = torch.sigmoid((1 - r) * 12)
    tex = torch.rand((batch, 1) + (6,) * nd, generator=g)
    mode = "bilinear" if nd == 2 else "trilinear"
    tex = torch.nn.functional.interpolate(tex, size=(S,) * nd, mode=mode, align_corners=True)
    img = body * (0.6 + 0.4 * tex)
    img = img - img.amin(dim=tuple(range(1, nd + 2)), keepdim=True)
    return img / img.amax(dim=tuple(range(1, nd + 2)), keepdim=True)


def make_net(nd: int, checkpoint, device):
    net = None
    if checkpoint:
        from napari_drdm.checkpoint import read_checkpoint
        state, cfg, _ = read_checkpoint(checkpoint)
        if cfg.ndim == nd:
            net = DRDMNet.from_config(cfg)
            net.load_state_dict(state, strict=True)
    if net is None:
        torch.manual_seed(0)
        net = DRDMNet(nd)
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def warm_allocator(mib: int = 16) -> None:
    """Raise glibc malloc's dynamic mmap/trim thresholds before anything is timed.

    glibc serves blocks above its mmap threshold (128 KiB at start) with fresh mmaps, returns
    them to the OS when freed, and page-faults (zero-fills) them again on the next allocation;
    the threshold only rises when such a block is freed.  The plain eager path allocates its
    activations afresh every pass (2.6-5 MiB at 256^2), so until some large block has been freed
    in the process it runs 10-20 % slower than it does in any process that has (measured at 2D
    256: 131-136 ms per pass cold, 114-116 ms warm; the default path pools its buffers and is
    unaffected).  Freeing one 16 MiB block puts every path in its steady, best state."""
    if platform.system() != "Linux":
        return
    big = torch.empty(mib << 18)          # mib MiB of float32
    big[:: 1024].zero_()                  # touch it
    del big


def environment(device, args):
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": autotune.cpu_model(),
        "openmp_wait": napari_drdm.OPENMP_WAIT,
        "cpu_capability": native_kernels.cpu_capability() or None,
        "onednn": _onednn_version(),
        "mkldnn_fusion_available": mkldnn_fusion_available(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return env


def _onednn_version():
    for line in torch.__config__.show().splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            return line.strip(" -")
    return None


# ---------------------------------------------------------------------------- one size
class Bench:
    def __init__(self, tag, nd, S, args, device):
        self.tag, self.nd, self.S, self.args, self.device = tag, nd, S, args, device
        self.cfg = DRDMConfig.default(nd, S)
        self.net = make_net(nd, args.checkpoint, device)
        self.engine = self.net.engine(native=False) if args.no_native else self.net.engine()
        self.K = self.cfg.k_recursions
        self.sampler = ForwardSampler(self.cfg, fast=True)
        self.sampler_plain = ForwardSampler(self.cfg, fast=False)
        self.x0 = phantom(nd, S).to(device)
        r = args.repeats
        # 3D is slow on a CPU: fewer repeats there (said in the output)
        if device.type == "cpu" and nd == 3:
            r = max(1, r // 2) if S <= 64 else max(1, args.repeats_3d_large)
        self.repeats = r

    def psi(self, batch=1, seed=0):
        draws = [self.sampler.draw(1, torch.Generator().manual_seed(seed + b)) for b in range(batch)]
        draws = [torch.cat([d[i] for d in draws]).to(self.device) for i in range(len(draws[0]))]
        return self.sampler.sample(T_PRIME, batch=batch, draws=draws, return_step=False).forward_ddf

    def stepper(self, fast, batch=1, schedule="reference", engine=None):
        x0 = self.x0.expand(batch, *self.x0.shape[1:]).contiguous()
        net = engine if engine is not None else (self.net.engine() if fast else self.net.forward_plain)
        gen = recover(net, x0, self.psi(batch), T_PRIME, **self.cfg.recover_options(schedule, self.K))
        return gen

    def time_steps(self, makers, n, log=None):
        """Interleaved: one step of each maker per round, n rounds (+1 warm-up).  An optional
        variant (not 'default'/'plain') that fails is reported and dropped."""
        gens, times = {}, {}
        for k, m in makers.items():
            try:
                gens[k] = m()
                times[k] = []
            except Exception as e:  # noqa: BLE001 - optional variants must not stop the run
                if k in ("default", "plain", "b"):
                    raise
                (log or print)(f"  variant {k} failed: {type(e).__name__}: {e}")
        for rnd in range(n + 1):
            for k in list(gens):
                try:
                    dt, fr = timed(lambda k=k: next(gens[k]), self.device)
                except Exception as e:  # noqa: BLE001
                    if k in ("default", "plain", "b"):
                        raise
                    (log or print)(f"  variant {k} failed: {type(e).__name__}: {str(e)[:300]}")
                    gens.pop(k).close()
                    times.pop(k)
                    continue
                if rnd > 0:
                    times[k].append(dt)
        for g in gens.values():
            g.close()
        return times

    def run(self, log):
        args, dev, S, nd = self.args, self.device, self.S, self.nd
        res = {"ndim": nd, "size": S, "K": self.K, "repeats": self.repeats, "t_prime": T_PRIME,
               "image_interp": self.cfg.image_interp, "compose_padding": self.cfg.compose_padding,
               "engine_backend": self.engine.backend(dev)}
        # the path the default engine takes for this input (measured once per machine and
        # combination, then cached: core/autotune.py), and why
        t_dec = time.perf_counter()
        dec = self.engine.path_decision(tuple(self.x0.shape), dev)
        res["path_decision"] = dict(dec.as_dict(), wall_s=time.perf_counter() - t_dec)
        res["native_kernels"] = dec.path == "native"
        log(f"  path: {dec.path} ({dec.source}): {dec.reason}"
            + (f"; measuring cost {dec.cost_s:.2f} s" if dec.cost_s is not None else ""))
        x = self.x0
        t = torch.full((1,), 40, dtype=torch.int64, device=dev)
        with torch.inference_mode():
            # --- bare network: one pass, and the K-recursive forward
            passes = {"default": [], "plain": []}
            fwd = {"default": [], "plain": []}
            fns = {"default": (lambda: self.engine.single_pass(x, t), lambda: self.engine(x, t, self.K)),
                   "plain": (lambda: self.net.single_pass(x, t), lambda: self.net.forward_plain(x, t, self.K))}
            if args.no_eager:
                fns.pop("plain")
            # both CPU paths forced, whichever the default chose: is the choice the fastest?
            alt = {}
            if self.engine.native_in_use(dev):          # the native kernels are a candidate here
                alt = {"onednn_only": InferenceEngine(self.net, native=False),
                       "native_only": InferenceEngine(self.net, native=True)}
            for name, eng in alt.items():
                fns[name] = (lambda e=eng: e.single_pass(x, t), lambda e=eng: e(x, t, self.K))
                passes[name], fwd[name] = [], []
            for p1, _ in fns.values():       # warm-up (oneDNN primitive creation, cuDNN autotuning)
                p1()
            for _ in range(self.repeats):
                for k, (p1, _) in fns.items():
                    passes[k].append(timed(p1, dev)[0])
                for k, (_, pk) in fns.items():
                    fwd[k].append(timed(pk, dev)[0])
            res["network_pass_s"] = {k: summary(v) for k, v in passes.items() if v}
            res["network_forward_s"] = {k: summary(v) for k, v in fwd.items() if v}
            log(f"  network pass      default {med(passes['default']) * 1e3:9.1f} ms"
                + ("" if args.no_eager else f"   plain {med(passes['plain']) * 1e3:9.1f} ms")
                + "".join(f"   {k} {med(passes[k]) * 1e3:9.1f} ms" for k in alt))

            # --- one reverse step (batch 1), interleaved
            makers = {"default": lambda: self.stepper(True)}
            if not args.no_eager:
                makers["plain"] = lambda: self.stepper(False)
            for name, eng in alt.items():
                makers[name] = (lambda e=eng: self.stepper(True, engine=e))
            if args.compile:
                ceng = InferenceEngine(self.net, fuse=False, compile=True)
                makers["compiled"] = lambda: self.stepper(True, engine=ceng)
            if dev.type == "cuda":           # is channels-last the right layout on this GPU?
                eng_nchw = InferenceEngine(self.net, channels_last=False)
                makers["default_nchw"] = lambda: self.stepper(True, engine=eng_nchw)
                eng_graph = InferenceEngine(self.net, cuda_graphs=True)     # opt-in CUDA graphs
                makers["cudagraph"] = lambda: self.stepper(True, engine=eng_graph)
            if args.amp and dev.type == "cuda":
                for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
                    eng = InferenceEngine(self.net, amp_dtype=dt)
                    makers[name] = (lambda e=eng: self.stepper(True, engine=e))
            steps = self.time_steps(makers, self.repeats, log)
            res["reverse_step_s"] = {k: summary(v) for k, v in steps.items()}
            step_d = med(steps["default"])
            log(f"  reverse step      default {step_d * 1e3:9.1f} ms"
                + ("" if args.no_eager else f"   plain {med(steps['plain']) * 1e3:9.1f} ms")
                + "".join(f"   {k} {med(v) * 1e3:9.1f} ms" for k, v in steps.items() if k not in ("default", "plain")))
            if alt:                          # the default vs the fastest forced path (issue 15: <= 1.05)
                fastest = min(alt, key=lambda k: med(steps[k]))
                res["default_vs_fastest_path"] = {"fastest": fastest, "ratio": step_d / med(steps[fastest])}
                log(f"  default / fastest path ({fastest}) = {res['default_vs_fastest_path']['ratio']:.3f} "
                    f"(reverse step)")
            res["overhead_ratio"] = step_d / (self.K * med(passes["default"]))
            if not args.no_eager:
                res["overhead_ratio_plain"] = med(steps["plain"]) / (self.K * med(passes["plain"]))
                res["speedup_vs_eager"] = med(steps["plain"]) / step_d
                res["network_speedup_vs_eager"] = med(passes["plain"]) / med(passes["default"])

            # --- forward sampler alone (T' = 45, batch 1)
            smp = {"default": [], "plain": []}
            draws = self.sampler.draw(1, torch.Generator().manual_seed(0))
            draws = [d.to(dev) for d in draws]
            for _ in range(max(self.repeats, 3)):
                smp["default"].append(timed(lambda: self.sampler.sample(T_PRIME, batch=1, draws=draws,
                                                                        return_step=False), dev)[0])
                smp["plain"].append(timed(lambda: self.sampler_plain.sample(T_PRIME, batch=1, draws=draws,
                                                                            return_step=False), dev)[0])
            res["forward_sampler_s"] = {k: summary(v) for k, v in smp.items()}
            log(f"  forward sampler   default {med(smp['default']) * 1e3:9.1f} ms"
                f"   plain {med(smp['plain']) * 1e3:9.1f} ms")

            # --- whole generations at T' = 45
            gens = {}
            n_steps = {s: len(reverse_timesteps(T_PRIME, self.cfg.n_steps, s)) for s in ("paper", "reference")}
            measure = args.gen_repeats > 0 and (nd == 2 or dev.type == "cuda" or args.measure_3d_generation)
            for sched in ("paper", "reference"):
                if measure:
                    ts = []
                    for _ in range(args.gen_repeats):
                        def whole(sched=sched):
                            psi = self.psi(1)
                            for _fr in recover(self.engine, self.x0, psi, T_PRIME,
                                               **self.cfg.recover_options(sched, self.K)):
                                pass
                        ts.append(timed(whole, dev)[0])
                    gens[sched] = summary(ts)
                else:
                    est = med(smp["default"]) + n_steps[sched] * step_d
                    gens[sched] = {"median": est, "n": 0}
            res["generation_s"] = gens
            res["generation_method"] = "measured" if measure else "extrapolated: sampler + steps x median step"
            res["generation_steps"] = n_steps
            log(f"  generation T'=45  paper ({n_steps['paper']} steps) {gens['paper']['median']:8.2f} s   "
                f"reference ({n_steps['reference']} steps) {gens['reference']['median']:8.2f} s"
                + ("" if measure else "   (extrapolated from the step time)"))

            # --- batches: samples per second (default schedule)
            sched = self.cfg.schedule
            per_batch = {}
            for B in self.batch_sizes():
                try:
                    if B == 1:
                        st = step_d
                    else:
                        n = max(2, self.repeats // 2)
                        st = med(self.time_steps({"b": lambda B=B: self.stepper(True, batch=B)}, n)["b"])
                    db = [d.to(dev) for d in self.sampler.draw(B, torch.Generator().manual_seed(1))]
                    def sample_once(B=B, db=db):
                        return self.sampler.sample(T_PRIME, batch=B, draws=db, return_step=False)
                    ts_s = med([timed(sample_once, dev)[0] for _ in range(2)])
                except torch.cuda.OutOfMemoryError:
                    log(f"  batch {B}: out of GPU memory, skipped")
                    torch.cuda.empty_cache()
                    break
                gen_t = ts_s + n_steps[sched] * st
                per_batch[B] = {"step_s": st, "step_s_per_sample": st / B, "sampler_s": ts_s,
                                "generation_s": gen_t, "samples_per_s": B / gen_t}
            best = max(per_batch, key=lambda b: per_batch[b]["samples_per_s"])
            res["batches"] = {str(b): v for b, v in per_batch.items()}
            res["samples_per_s"] = {"schedule": sched, "batch1": per_batch[1]["samples_per_s"],
                                    "best": per_batch[best]["samples_per_s"], "best_batch": best}
            log(f"  samples/s ({sched} schedule, T'=45)  batch 1: {per_batch[1]['samples_per_s']:.4f}   "
                f"best: {per_batch[best]['samples_per_s']:.4f} at batch {best}   "
                + "  ".join(f"[B={b}: step {v['step_s'] * 1e3:.0f} ms]" for b, v in per_batch.items()))

        # --- peak memory
        if dev.type == "cuda":
            res["peak_memory"] = self.cuda_memory()
        elif not args.no_memory_probe:
            res["peak_memory"] = memory_probe(self.tag, args)
        if "peak_memory" in res:
            pm = res["peak_memory"]
            log("  peak memory       " + ", ".join(f"{k} {v}" for k, v in pm.items() if k != "what"))
        n_t1 = args.table1 or (args.amp_seeds if args.amp else 0)
        if n_t1 and nd == 2:                          # Table 1 is a 2D table
            res["table1"] = table1_metrics(self, args, log, n_t1)
        return res

    def batch_sizes(self):
        sizes = [int(b) for b in self.args.batch_sizes.split(",") if b.strip()]
        if 1 not in sizes:
            sizes = [1] + sizes
        if self.device.type == "cpu" and self.nd == 3:
            sizes = [b for b in sizes if b <= (2 if self.S <= 64 else 1)]
        elif self.nd == 3:                  # GPU: activations grow as B * S^3
            sizes = [b for b in sizes if b * (self.S // 64) ** 3 <= 16]
        return sorted(set(sizes))

    def cuda_memory(self):
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode():
            for i, _fr in enumerate(self.stepper(True, schedule="paper")):
                if i >= 2:
                    break
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return {"what": "torch.cuda.max_memory_allocated during 3 reverse steps at batch 1 (incl. sampler)",
                "peak_mib": round(peak / 2 ** 20, 1), "growth_mib": round((peak - base) / 2 ** 20, 1)}


# ---------------------------------------------------------------------------- memory probe (CPU)
def _status_mib(field):
    """VmRSS / VmHWM from /proc/self/status (Linux), MiB; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mib():
    v = _status_mib("VmRSS")
    return v if v is not None else float("nan")


def _maxrss_mib():
    # VmHWM: the peak of this process image only (ru_maxrss would also count the parent's
    # resident pages at fork time, which a child inherits across exec)
    v = _status_mib("VmHWM")
    if v is not None:
        return v
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2 ** 20


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(tag, args):
    """Run a generation with frames in a fresh process and read its peak RSS."""
    cmd = [sys.executable, __file__, "--_probe", tag, "--threads", str(torch.get_num_threads())]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"what": "probe failed", "error": r.stderr[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def probe_main(tag, args):
    from napari_drdm.model import DRDM
    _, nd, S = parse_size(tag)
    cfg = DRDMConfig.default(nd, S)
    net = make_net(nd, args.checkpoint, torch.device("cpu"))
    model = DRDM(net, cfg, "cpu")
    img = phantom(nd, S)[0, 0].numpy()
    base_peak = _maxrss_mib()
    reset = _reset_peak()
    base_rss = _rss_mib()
    # a GUI-like run: every forward frame and the first recovery frames rendered (field, image),
    # handed over and dropped; 3D 128 is slow on a CPU, so only a few recovery steps there
    n_rec = {2: 10 ** 9}.get(nd, 3 if S <= 64 else 2)
    n_fwd = n_seen = 0
    gen = model.iter_generate(img, t_prime=T_PRIME, seed=0, schedule="paper", frames=True)
    for fr in gen:
        if fr.phase == "forward":
            n_fwd += 1
        else:
            n_seen += 1
            if n_seen >= n_rec:
                break
    gen.close()
    peak = _maxrss_mib()
    how = "peak RSS (VmHWM, reset after set-up)" if reset else "peak RSS of the process"
    print(json.dumps({"what": f"{how} of a fresh process running DRDM.iter_generate: {n_fwd} forward + "
                              f"{n_seen} recovery frames rendered and dropped (T'=45, paper schedule)",
                      "peak_rss_mib": round(peak, 1), "growth_mib": round(peak - max(base_rss, 0), 1),
                      "rss_after_setup_mib": round(base_rss, 1), "peak_during_setup_mib": round(base_peak, 1)}))


# ---------------------------------------------------------------------------- Table 1; mixed precision
def table1_metrics(bench: Bench, args, log, n_seeds: int):
    """Table 1 metrics (max %, mean %, folding %) of whole generations at T'=45 in both loops,
    plain path against the default path (and each precision: measured on CUDA, emulated on a CPU
    with ``--amp``): same seeds, same images.  Also how far one network pass of each variant lands
    from the plain float32 one (``single_pass_deviation``).

    ``*_strict`` variants switch cuDNN's TF32 off (true float32 convolutions); PyTorch's default
    lets cuDNN use TF32 for float32 convolutions on Ampere and later GPUs."""
    from napari_drdm.core.metrics import field_metrics
    dev, cfg = bench.device, bench.cfg
    images = load_images(args, bench.nd, bench.S, dev)
    variants = {
        "fp32_plain": (bench.net.forward_plain, None),
        "fp32": (InferenceEngine(bench.net), None),
    }
    if dev.type == "cuda":
        variants = {
            "fp32_plain_strict": (bench.net.forward_plain, False),
            "fp32_plain": (bench.net.forward_plain, None),
            "fp32_strict": (InferenceEngine(bench.net), False),
            "fp32": (InferenceEngine(bench.net), None),
            "bf16": (InferenceEngine(bench.net, amp_dtype=torch.bfloat16), None),
            "fp16": (InferenceEngine(bench.net, amp_dtype=torch.float16), None),
        }
    elif args.amp:
        # no GPU: autocast's bf16/fp16 numerics reproduced on this device (autocast_emulation.py);
        # what they do to the outputs, not to the time
        from autocast_emulation import EmulatedAutocastEngine
        variants["fp32_generic"] = (InferenceEngine(bench.net, fuse=False), None)
        variants["bf16_emulated"] = (EmulatedAutocastEngine(bench.net, torch.bfloat16), None)
        variants["fp16_emulated"] = (EmulatedAutocastEngine(bench.net, torch.float16), None)
    keys = ("max_disp_pct", "mean_disp_pct", "folding_pct")
    out = {"single_pass_deviation": pass_deviation(bench, variants, images)}
    for name, d in out["single_pass_deviation"].items():
        log(f"  one network pass, {name:18s} vs fp32_plain: mean |diff| {d['mean_abs']:.2e} "
            f"({100 * d['mean_rel']:.2f} % of the mean |output|), max |diff| {d['max_abs']:.2e}")
    default_tf32 = torch.backends.cudnn.allow_tf32
    for name, (net, tf32) in variants.items():
        torch.backends.cudnn.allow_tf32 = default_tf32 if tf32 is None else tf32
        rows = []
        t0 = time.perf_counter()
        try:
            for seed in range(n_seeds):
                img = images[seed % len(images)][None]
                psi = bench.psi(1, seed=1000 + seed)
                with torch.inference_mode():
                    for sched in ("paper", "reference"):
                        phi = psi
                        for fr in recover(net, img, psi, T_PRIME, **cfg.recover_options(sched, bench.K)):
                            phi = fr.ddf
                        m = field_metrics(phi[0], side=bench.S)
                        rows.append({"seed": seed, "schedule": sched, **{k: float(m[k]) for k in keys}})
        finally:
            torch.backends.cudnn.allow_tf32 = default_tf32
        agg = {}
        for sched in ("paper", "reference"):
            sel = [r for r in rows if r["schedule"] == sched]
            agg[sched] = {k: {"mean": float(np.mean([r[k] for r in sel])),
                              "sd": float(np.std([r[k] for r in sel], ddof=1)) if len(sel) > 1 else 0.0}
                          for k in keys}
        out[name] = {"cudnn_allow_tf32": (default_tf32 if tf32 is None else tf32) if dev.type == "cuda" else None,
                     "n": n_seeds,
                     "metrics": agg, "rows": rows, "wall_s": time.perf_counter() - t0}
        log(f"  Table 1 {name:18s} paper: " + " / ".join(
            f"{agg['paper'][k]['mean']:.2f}+-{agg['paper'][k]['sd']:.2f}" for k in keys)
            + "   reference: " + " / ".join(
            f"{agg['reference'][k]['mean']:.2f}+-{agg['reference'][k]['sd']:.2f}" for k in keys))
    return out


def pass_deviation(bench: Bench, variants, images, ts=(10, 40, 70)):
    """How far one network pass (K = 1) of each variant lands from the plain float32 pass, on the
    Table 1 images at a few diffusion times: mean and max |difference|, in fractions of S."""
    out = {}
    with torch.inference_mode():
        refs = [(img[None], t, bench.net.single_pass(img[None], torch.tensor([t], device=bench.device)))
                for img in images for t in ts]
        scale = float(torch.stack([r.abs().mean() for _, _, r in refs]).mean())
        for name, (net, _) in variants.items():
            one = getattr(net, "single_pass", None)
            if one is None:                 # the plain variants (bound forward_plain): the reference
                continue
            diffs = [(one(x, torch.tensor([t], device=bench.device)).float() - r).abs() for x, t, r in refs]
            mean_abs = float(torch.stack([d.mean() for d in diffs]).mean())
            out[name] = {"mean_abs": mean_abs, "mean_rel": mean_abs / scale,
                         "max_abs": float(max(d.max() for d in diffs)), "ts": list(ts), "n_images": len(images)}
    return out


def load_images(args, nd, S, dev):
    """ACDC slices (reference data) when given/found and 2D at their size, else phantoms."""
    cand = [args.images] if args.images else []
    ref = settings_env.get("REFERENCE_DIR", str(ROOT.parent / "shared" / "reference"))
    cand.append(os.path.join(ref, "acdc_slices256.npz"))
    for c in cand:
        if c and nd == 2 and os.path.exists(c):
            a = np.load(c)["images"].astype(np.float32)
            x = torch.from_numpy(a)[:, None]
            if a.shape[-1] != S:
                x = torch.nn.functional.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            return ((x - lo) / (hi - lo + 1e-7)).to(dev)
    return phantom(nd, S, batch=8, seed=3).to(dev)


# ---------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma list of 2dS/3dS (default {DEFAULT_SIZES})")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed repeats per figure in 2D (3D on a CPU: half at 64^3, --repeats-3d-large above)")
    ap.add_argument("--repeats-3d-large", type=int, default=1, help="repeats for 3D sizes above 64 on a CPU")
    ap.add_argument("--gen-repeats", type=int, default=1,
                    help="whole generations timed per schedule (2D; 0: extrapolate from the step time)")
    ap.add_argument("--measure-3d-generation", action="store_true",
                    help="time whole 3D generations too (slow on a CPU) instead of extrapolating")
    ap.add_argument("--batch-sizes", default="1,2,4,8", help="batch sizes for samples/s (3D on a CPU: <= 2 / 1)")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write the results as JSON to PATH ('-' or no value: stdout)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's default)")
    ap.add_argument("--checkpoint", default=None, help="weights to use (default: random initialisation)")
    ap.add_argument("--images", default=None, help="npz with 'images' (N, S, S) for --amp metrics")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the generic engine")
    ap.add_argument("--amp", action="store_true",
                    help="bf16/fp16 autocast: on CUDA their step times and Table 1 metrics; on a "
                         "CPU their Table 1 metrics, computed with autocast's numerics emulated "
                         "(benchmarks/autocast_emulation.py)")
    ap.add_argument("--amp-seeds", type=int, default=10, help="generations per precision for --amp metrics")
    ap.add_argument("--table1", type=int, default=0, metavar="N",
                    help="2D: Table 1 metrics of N whole generations per loop, plain vs default path "
                         "(and each precision with --amp); slow on a CPU")
    ap.add_argument("--no-eager", action="store_true", help="skip the plain eager baseline")
    ap.add_argument("--no-native", action="store_true",
                    help="default path without the compiled native kernels (core/native.py): oneDNN only")
    ap.add_argument("--cold-allocator", action="store_true",
                    help="skip the malloc warm-up (warm_allocator): the plain path then page-faults "
                         "its activations on every pass and looks 10-20 %% slower")
    ap.add_argument("--no-memory-probe", action="store_true", help="CPU: skip the peak-memory subprocess")
    ap.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    add_force_arg(ap)
    args = ap.parse_args(argv)
    if not args._probe:
        check_outputs(ap, args.force, args.json)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args._probe:
        probe_main(args._probe, args)
        return 0
    from napari_drdm.model import pick_device
    device = pick_device(None if args.device == "auto" else args.device)
    if not args.cold_allocator:
        warm_allocator()
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    to_stdout = args.json == "-"
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if to_stdout else (lambda s: print(s, flush=True))

    env = environment(device, args)
    env["allocator_warmed"] = not args.cold_allocator
    if device.type == "cpu" and not args.no_native:
        native_kernels.load()
    env["native_kernels"] = "off (--no-native)" if args.no_native else \
        f"{native_kernels.status()}; path chosen per size by measurement (core/autotune.py)" \
        if autotune.enabled() and not os.environ.get("NAPARI_DRDM_NATIVE") else \
        f"{native_kernels.status()}; {native_kernels.auto_enabled()[1]}"
    env["autotune_cache"] = str(autotune.cache_file())
    log(f"DRDM speed benchmark - {env['device']} ({env.get('gpu') or env['cpu_model']}), "
        f"{env['torch_threads']} threads, torch {env['torch']}, numpy {env['numpy']}, python {env['python']}")
    log(f"  OpenMP waiting: {env['openmp_wait']}")
    log(f"  oneDNN: {env['onednn']}; CPU capability {env['cpu_capability']}; load average at start "
        f"{env['load_average_at_start']}")
    if device.type == "cpu":
        log(f"  native kernels: {env['native_kernels']}")
    log(f"  T'={T_PRIME}; medians over interleaved repeats; 'default' = the project's default path "
        f"(core/fast.py), 'plain' = eager float32 modules")
    results = {"environment": env, "sizes": {}, "overhead_ratio": {}, "speedup_vs_eager": {}}
    t_all = time.perf_counter()
    for tag, nd, S in sizes:
        t0 = time.perf_counter()
        b = Bench(tag, nd, S, args, device)
        log(f"\n{tag}: {nd}D {S}^{nd}, batch 1, K={b.K}, {b.repeats} repeat(s), engine backend "
            f"'{b.engine.backend(device)}'")
        r = b.run(log)
        r["wall_s"] = time.perf_counter() - t0
        results["sizes"][tag] = r
        results["overhead_ratio"][tag] = r["overhead_ratio"]
        if "speedup_vs_eager" in r:
            results["speedup_vs_eager"][tag] = r["speedup_vs_eager"]
        log(f"  => overhead ratio {r['overhead_ratio']:.3f} (step / (K x pass), default path)"
            + (f";  speedup vs eager {r['speedup_vs_eager']:.2f}x (step), network pass "
               f"{r['network_speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "")
            + f"   [{r['wall_s']:.0f} s]")
        del b
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json and not to_stdout:           # partial results survive a time limit
            write_json(args.json, results)
    env["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    env["total_wall_s"] = time.perf_counter() - t_all
    log(f"\nload average at end {env['load_average_at_end']}; total {env['total_wall_s']:.0f} s")
    if args.json:
        if to_stdout:
            print(json.dumps(results, indent=1, default=float))
        else:
            write_json(args.json, results)
            log(f"JSON written to {args.json}")
    return 0


def write_json(path, results):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
