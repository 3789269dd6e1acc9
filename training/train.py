"""The DRDM training loop (paper Algorithm 1).

Per step and sample: t ~ U{0..T-1}; (psi_{t:1}, psi_t) from the forward sampler (pixels, float32);
I_t = warp(I0, psi_{t:1}) (bilinear, zeros); psi_hat = net(I_t, t, K); loss =
drdm_losses(psi_hat, psi_t / S) = dist + ang + 10 reg (+ true_negdet_weight * relu(-det(I + grad)))
and an Adam step.  CPU or CUDA (bf16 autocast on the network only); several processes with
``torchrun`` (DistributedDataParallel, nccl on CUDA, gloo on CPU).  Each rank has its own RNG
streams; rank 0 logs and checkpoints.  A checkpoint holds everything needed to continue exactly
(model, optimiser, step, every rank's generator states, the data sampler position).

Files in the run directory: ``config.yaml`` (the effective configuration), ``train_log.jsonl``
(one JSON object per logged step / validation), ``checkpoints/step_XXXXXXXX.pt`` (``torch.load(
weights_only=True)`` compatible).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from .classic_augment import augment
from .data import SliceBank, ensure_core, load_prepared, prepare, prepared_info, synthetic_images
from .evaluate_hook import Validator
from .settings import DEFAULTS, load_config, model_config  # noqa: F401  (re-exported)

ensure_core()

from napari_drdm.core.config import DRDMConfig  # noqa: E402
from napari_drdm.core.forward import ForwardSampler  # noqa: E402
from napari_drdm.core.losses import drdm_losses  # noqa: E402
from napari_drdm.core.network import DRDMNet  # noqa: E402
from napari_drdm.core.spatial import px_to_frac, warp  # noqa: E402

__all__ = ["DEFAULTS", "load_config", "model_config", "train", "spawn_local", "latest_checkpoint",
           "load_training_checkpoint"]

CKPT_FORMAT = "napari-drdm-train/1"


# ------------------------------------------------------------------------------ environment
class Env:
    """Process placement: rank, world size, device, autocast dtype."""

    def __init__(self, tcfg: Dict[str, Any]):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want = tcfg["device"]
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device(want)
        amp = "off" if tcfg["amp"] in (False, None, "off", "none") else str(tcfg["amp"])
        if amp not in ("off", "auto", "bf16"):
            raise ValueError(f"train.amp must be 'auto', 'bf16' or 'off', got {amp!r}")
        use_bf16 = amp == "bf16" or (amp == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        if int(tcfg.get("threads") or 0) > 0:
            torch.set_num_threads(int(tcfg["threads"]))
        self.distributed = self.world > 1
        if self.distributed and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            import datetime
            # rank 0 validates while the others wait in a barrier: allow long validations
            torch.distributed.init_process_group(backend=backend, rank=self.rank, world_size=self.world,
                                                 timeout=datetime.timedelta(hours=2))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if self.device.type == "cuda":
            return f"{self.world} x {torch.cuda.get_device_name(self.device)}"
        return f"{self.world} x cpu ({torch.get_num_threads()} threads)"

    def any_flag(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            values = values.clone()
            torch.distributed.all_reduce(values)
            values /= self.world
        return values

    def gather(self, obj):
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.distributed:
            torch.distributed.barrier()


# ------------------------------------------------------------------------------ checkpoints
def latest_checkpoint(run_dir) -> Optional[Path]:
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"))
    return ckpts[-1] if ckpts else None


def load_training_checkpoint(path) -> Dict[str, Any]:
    ck = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a training checkpoint of this trainer")
    return ck


def _save_atomic(obj: Dict[str, Any], path: Path, keep: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, str(tmp))
    os.replace(tmp, path)
    for old in sorted(path.parent.glob("step_*.pt"))[:-max(int(keep), 1)]:
        old.unlink()


def _plain(o):
    """Plain Python values only (what torch.load(weights_only=True) accepts besides tensors)."""
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, torch.Tensor) or o is None:
        return o
    for kind in (bool, int, float, str):
        if isinstance(o, kind):
            return kind(o)
    return o.item() if hasattr(o, "item") else str(o)


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "training"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------- helpers
def _rng_state(gens: Dict[str, torch.Generator], device) -> Dict[str, Any]:
    st = {k: g.get_state() for k, g in gens.items()}
    st["torch"] = torch.get_rng_state()
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(gens: Dict[str, torch.Generator], st: Dict[str, Any], device):
    for k, g in gens.items():
        if k in st:
            g.set_state(st[k])
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _generators(seed: int, rank: int, device) -> Dict[str, torch.Generator]:
    """Per-rank streams: 'field' (forward draws, on the device), 'aug' (augmentation, on the device)
    and, off the CPU, 't' (time steps, on the host so the sampler's schedule needs no device sync;
    on the CPU the time steps come from 'field')."""
    out = {}
    names = ("field", "aug") if torch.device(device).type == "cpu" else ("field", "aug", "t")
    for i, name in enumerate(names):
        g = torch.Generator(device="cpu" if name == "t" else device)
        g.manual_seed(int(seed) * 1_000_003 + rank * 7919 + i * 104_729 + 17)
        out[name] = g
    return out


def _draws(mcfg: DRDMConfig, B: int, g: torch.Generator, device) -> List[torch.Tensor]:
    """The sampler's 8 standard-normal fields (ForwardSampler.draw order), drawn on ``device``."""
    return [torch.randn((B, mcfg.ndim) + (s,) * mcfg.ndim, generator=g, device=device)
            for _ in range(2) for s in mcfg.scales]


def _dataset(cfg: Dict[str, Any], env: Optional[Env] = None) -> Dict[str, Any]:
    """The prepared data of a config (train / val uint8 arrays, sha256, metadata)."""
    d, m = cfg["data"], cfg["model"]
    if d.get("prepared"):
        p = Path(d["prepared"])
        if not p.exists():
            if d["kind"] != "synthetic":
                raise FileNotFoundError(f"prepared data {p} not found: run `python -m training prepare "
                                        f"--config <this config>` first")
            if env is None or env.main:
                prepare(cfg, log=lambda *_: None)
            if env is not None:
                env.barrier()
        return load_prepared(str(p))
    if d["kind"] != "synthetic":
        raise ValueError("data.prepared must name the prepared file for data.kind 'kit'")
    import hashlib
    n, seed = int(d.get("n_synthetic", 64)), int(d.get("seed", 0))
    tr = synthetic_images(n, int(m["size"]), int(m["ndim"]), seed=seed * 7)
    va = synthetic_images(max(2, n // 8), int(m["size"]), int(m["ndim"]), seed=seed * 7 + 1)
    sha = hashlib.sha256(tr.tobytes() + va.tobytes()).hexdigest()
    return {"train": tr, "val": va, "sha256": sha, "meta": {"kind": "synthetic", "counts": {"train": n},
                                                            "sources": {"synthetic": {"seed": seed, "n": n}}}}


class _Log:
    def __init__(self, path: Optional[Path]):
        self.f = open(path, "a") if path else None

    def write(self, rec: Dict[str, Any]):
        if self.f:
            self.f.write(json.dumps(rec, sort_keys=True) + "\n")
            self.f.flush()

    def close(self):
        if self.f:
            self.f.close()


# -------------------------------------------------------------------------------------- train
def train(cfg: Dict[str, Any], run_dir, resume: bool = False, argv: Optional[Sequence[str]] = None,
          echo=print) -> Dict[str, Any]:
    """Train until ``train.steps`` or the ``budget.max_minutes`` wall-clock budget; returns a summary."""
    t_start = time.time()
    run_dir = Path(run_dir)
    tcfg, lcfg, ocfg = cfg["train"], cfg["loss"], cfg["optim"]
    env = Env(tcfg)
    say = echo if env.main else (lambda *a, **k: None)
    ckpt_path = latest_checkpoint(run_dir) if resume else None
    if not resume and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume or choose another --run")
    ck = load_training_checkpoint(ckpt_path) if ckpt_path else None
    if env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    mcfg = model_config(cfg)
    S, T, K, dev = mcfg.size, mcfg.n_steps, mcfg.k_recursions, env.device

    data = _dataset(cfg, env)
    bank = SliceBank(data["train"], int(tcfg["batch_size"]), device=dev, seed=int(tcfg["seed"]),
                     rank=env.rank, world=env.world)
    torch.manual_seed(int(tcfg["seed"]))
    model = DRDMNet.from_config(mcfg).to(dev)
    init_info = None
    if ck is None and cfg.get("init"):
        init_info = load_init(model, cfg["init"], str(cfg.get("init_inflate") or "centre"))
        say(f"initialised from {init_info['source']} (sha256 {init_info['sha256'][:12]}...)")
    elif ck is None:
        scale_head(model, float(ocfg.get("head_init_scale", 1.0)))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=float(ocfg["lr"]),
                           betas=tuple(ocfg["betas"]), weight_decay=float(ocfg["weight_decay"]))
    gens = _generators(int(tcfg["seed"]), env.rank, dev)
    step, history, last_val, wall_before = 0, [], None, 0.0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        # the optimiser's state carries the learning rate it was saved with; the configuration's
        # applies (resume with --set optim.lr=... to continue at another rate; Adam's moments stay)
        saved_lr, lr = opt.param_groups[0]["lr"], float(ocfg["lr"])
        for gr in opt.param_groups:
            gr["lr"] = lr
        if saved_lr != lr:
            say(f"learning rate {saved_lr:g} -> {lr:g} (optim.lr of the configuration)")
        step, history, last_val = int(ck["step"]), list(ck["history"]), ck.get("last_val")
        init_info = ck.get("init")
        wall_before = float(ck.get("wall_s_total", 0.0))
        bank.load_state_dict(ck["bank"])
        if int(ck["world_size"]) == env.world and ck.get("batch_size") == int(tcfg["batch_size"]):
            _set_rng_state(gens, ck["rng"][env.rank], dev)
        else:  # a different layout cannot continue the same streams: reseed deterministically
            say(f"note: checkpoint written with world size {ck['world_size']}, now {env.world}: RNG reseeded")
            gens = _generators(int(tcfg["seed"]) + step, env.rank, dev)
        if ck.get("data", {}).get("prepared_sha256") != data["sha256"]:
            say("WARNING: the prepared data differ from the checkpoint's (sha256 mismatch)")
        say(f"resumed {ckpt_path} at step {step}")
    net = model
    if env.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if dev.type == "cuda" else None)
    sampler = ForwardSampler(mcfg)
    validator = Validator(mcfg, data["val"], cfg["validation"], lcfg, dev, env.autocast_dtype) if env.main else None
    log = _Log(run_dir / "train_log.jsonl" if env.main else None)
    entry = {"argv": list(argv if argv is not None else sys.argv), "start_step": step, "device": env.describe(),
             "world_size": env.world, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": _git_commit(),
             "torch": torch.__version__, "prepared_sha256": data["sha256"]}
    say(f"training {cfg.get('name')} on {entry['device']}: S={S} ndim={mcfg.ndim} batch {tcfg['batch_size']}"
        f"/rank, steps {step}->{tcfg['steps']}, {len(bank)} train images, {model.n_trainable()} parameters")

    # SIGTERM: stop after the current step, save, exit 0.  In a single process the step in
    # flight is abandoned instead when the signal arrives before the update (a slow CPU step may
    # outlive the grace period before SIGKILL): its random streams and data position are rolled
    # back, so the saved state is exactly the one before that step.
    stop = {"signal": None, "abortable": False}

    def _on_signal(signum, _frame):
        stop["signal"] = signum
        if stop["abortable"]:
            stop["abortable"] = False
            raise _StepAborted()
    old_handler = signal.signal(signal.SIGTERM, _on_signal) if _is_main_thread() else None

    max_min = cfg["budget"].get("max_minutes")
    target, log_every = int(tcfg["steps"]), max(int(tcfg["log_every"]), 1)
    ck_every, v_every = int(tcfg["checkpoint_every"]), int(cfg["validation"].get("every") or 0)
    clip, warm, base_lr = float(ocfg.get("grad_clip") or 0.0), int(ocfg.get("warmup_steps") or 0), float(ocfg["lr"])
    acc: Optional[torch.Tensor] = None      # running sums on the device (no host sync per step)
    keys: List[str] = []
    n_acc, n_skip, t_int, reason = 0, 0, time.time(), "steps"
    bar = _progress(env.main, step, target)

    def save(tag: str):
        states = env.gather(_rng_state(gens, dev))
        if env.main:
            now = dict(entry, end_step=step, wall_s=time.time() - t_start, stop_reason=tag)
            obj = {"format": CKPT_FORMAT, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                   "bank": bank.state_dict(), "rng": states, "world_size": env.world,
                   "batch_size": int(tcfg["batch_size"]), "config": _plain(cfg), "model_config": _plain(mcfg.to_dict()),
                   "history": _plain(history + [now]), "data": _plain(prepared_info(data)),
                   "last_val": _plain(last_val), "init": _plain(init_info),
                   "wall_s_total": wall_before + time.time() - t_start}
            _save_atomic(obj, run_dir / "checkpoints" / f"step_{step:08d}.pt", int(tcfg["keep_checkpoints"]))
        env.barrier()

    fixed: Dict[str, Any] = {}   # train.overfit_batch: the first batch, reused at every step

    def forward_backward():
        if fixed:
            x0, t, fs, img_t = fixed["batch"]
        else:
            x0 = augment(bank.next_batch(), cfg["augment"], gens["aug"])
            t = torch.randint(0, T, (x0.shape[0],), generator=gens.get("t", gens["field"]))      # host tensor
            fs = sampler.sample(t, draws=_draws(mcfg, x0.shape[0], gens["field"], dev), device=dev)
            img_t = warp(x0, fs.forward_ddf, "linear", "zeros")
            if tcfg.get("overfit_batch"):
                fixed["batch"] = (x0, t, fs, img_t)
        with torch.autocast(device_type=dev.type, dtype=env.autocast_dtype, enabled=env.autocast_dtype is not None):
            psi_hat = net(img_t, t.to(dev, non_blocking=True), k=K)
        terms = drdm_losses(psi_hat.float(), px_to_frac(fs.step_ddf, S), padding=lcfg["padding"],
                            w_dist=float(lcfg["w_dist"]), w_ang=float(lcfg["w_ang"]), w_reg=float(lcfg["w_reg"]),
                            w_true_negdet=float(lcfg["true_negdet_weight"] or 0.0))
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        return terms, x0.shape[0]

    while step < target:
        if stop["signal"] is not None and not env.distributed:
            reason = "signal"
            break
        if warm:
            for gr in opt.param_groups:
                gr["lr"] = base_lr * min(1.0, (step + 1) / warm)
        snap = ({k: g.get_state() for k, g in gens.items()}, bank.state_dict()) if not env.distributed else None
        try:
            stop["abortable"] = snap is not None and stop["signal"] is None
            terms, B = forward_backward()
            stop["abortable"] = False
        except _StepAborted:
            for k, st in snap[0].items():
                gens[k].set_state(st)
            bank.load_state_dict(snap[1])
            opt.zero_grad(set_to_none=True)
            reason = "signal"
            break
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        if env.any_flag(not bool(torch.isfinite(gnorm))):   # skip (on every rank) a non-finite update
            opt.zero_grad(set_to_none=True)
            n_skip += 1
        else:
            opt.step()
        step += 1
        keys = keys or sorted(terms) + ["grad_norm"]
        row = torch.stack([terms[k].detach() for k in keys[:-1]] + [gnorm.detach()]).to(torch.float64)
        acc = row if acc is None else acc + row
        n_acc += 1
        if bar is not None:
            bar.update(1)
        if step % log_every == 0 or step == target:
            vals = env.mean(acc / n_acc).tolist()
            dt = time.time() - t_int
            rec = {"step": step, "lr": opt.param_groups[0]["lr"], "it_s": n_acc / max(dt, 1e-9),
                   "samples_s": n_acc * B * env.world / max(dt, 1e-9), "epoch": bank.epoch,
                   "elapsed_min": (time.time() - t_start) / 60, "skipped_nonfinite": n_skip}
            rec.update(dict(zip(keys, vals)))
            log.write(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['total']:.4g}", refresh=False)
            acc, n_acc, t_int = None, 0, time.time()
        if (v_every and step % v_every == 0) or (step == target and cfg["validation"].get("at_end")):
            last_val = _validate(validator, model, step, log, say, env)
        over = max_min is not None and (time.time() - t_start) / 60.0 >= float(max_min)
        if env.any_flag(over or stop["signal"] is not None) and step < target:
            reason = "signal" if stop["signal"] is not None else "budget"
            break
        if ck_every and step % ck_every == 0 and step < target:
            save("periodic")
    digests = env.gather(_param_digest(model))
    entry["ranks_in_sync"] = len(set(digests)) == 1
    save(reason)
    if bar is not None:
        bar.close()
    if old_handler is not None:
        signal.signal(signal.SIGTERM, old_handler)
    log.write({"event": "stop", "step": step, "reason": reason, "elapsed_min": (time.time() - t_start) / 60,
               "world_size": env.world, "param_sha256": digests, "ranks_in_sync": entry["ranks_in_sync"]})
    log.close()
    say(f"stopped at step {step} ({reason}) after {(time.time() - t_start) / 60:.1f} min")
    return {"step": step, "reason": reason, "last_val": last_val, "run_dir": str(run_dir)}


class _StepAborted(Exception):
    """Raised by the SIGTERM handler to abandon the step in flight (single process only)."""


class InitError(ValueError):
    """Starting weights (``init``) that cannot seed the configured network."""


def load_init(model: DRDMNet, source, inflate: str = "centre") -> Dict[str, Any]:
    """Load starting weights into ``model`` (strict: every tensor present, same shapes).

    Args:
        model: the freshly built network of the run's ``model`` configuration.
        source: a weights file (``.safetensors``, reference ``.pth``, or a training checkpoint
            ``step_*.pt``) or the name of a bundled model (``cmr2d``, ``brain2d``...).
        inflate: how 2D weights seed a 3D model (``init_inflate``: ``centre`` or ``spread``,
            training/inflate.py).

    Returns:
        The provenance of the starting weights (source, sha256, their own config and provenance),
        stored in every checkpoint of the run and carried into the export.
    """
    from napari_drdm.checkpoint import CheckpointError, file_sha256, read_checkpoint
    path = Path(str(source))
    if not path.exists():
        try:
            from napari_drdm.weights import resolve_weights
            path = Path(resolve_weights(str(source))[0])
        except (LookupError, OSError):
            raise InitError(f"init: {source!r} is neither a weights file nor a bundled model name") from None
    try:
        if path.suffix == ".pt" and path.name.startswith("step_"):
            ck = load_training_checkpoint(path)
            state, icfg, iprov = ck["model"], model_config(ck["config"]).to_dict(), {"training_checkpoint": path.name,
                                                                                     "steps": int(ck["step"])}
        else:
            state, c, iprov = read_checkpoint(path)
            icfg = c.to_dict()
    except CheckpointError as e:
        raise InitError(f"init: {e}") from None
    own = model.state_dict()
    head = state.get("conv_out.weight")
    if model.ndim == 3 and head is not None and head.dim() == 4:       # 2D weights for a 3D model
        from .inflate import inflate_state_dict
        try:
            state = inflate_state_dict(state, model, inflate)
        except ValueError as e:
            raise InitError(f"init: {path} cannot be inflated to the configured 3D network: {e}") from None
        iprov = dict(iprov, inflated_2d_to_3d=inflate)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
           if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        parts = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {unexpected[:3]}"] if unexpected
                                                                    else []) + ([f"shape {bad[:3]}"] if bad else [])
        raise InitError(f"init: {path} does not fit the configured network (model.ndim/channels/n_steps): "
                        + "; ".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return {"source": str(source), "file": path.name, "sha256": file_sha256(path), "config": icfg,
            "provenance": iprov}


def scale_head(model: DRDMNet, scale: float):
    """Multiply the output convolution's initial weights and bias by ``scale`` (``optim.head_init_scale``).

    With PyTorch's default initialisation the untrained network predicts displacements of tens of
    pixels while one forward step moves pixels by less than two: the ``dist`` ratio starts near
    1e4 and the first thousands of steps only shrink the output, with gradient-norm spikes of
    1e5-1e8.  A small head (1e-3) starts the ratio at 1 (the "predict nothing" solution) and keeps
    the gradient norm near 1e3 (training/README.md, "Initialisation").  1.0 leaves the default.
    """
    if scale != 1.0:
        with torch.no_grad():
            model.conv_out.weight.mul_(scale)
            model.conv_out.bias.mul_(scale)


def _validate(validator, model, step, log, say, env):
    res = None
    if validator is not None and validator:
        t0 = time.time()
        res = validator.run(model)
        res["step"] = step
        log.write(dict(res, event="validation", seconds=time.time() - t0))
        say("val @%d: " % step + ", ".join(f"{k[4:]}={v:.3g}" for k, v in res.items()
                                           if k.endswith(("total", "folding_pct", "mean_disp_pct"))))
    env.barrier()
    return res


def _param_digest(model) -> str:
    import hashlib
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _progress(main: bool, step: int, target: int):
    if not main:
        return None
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(total=target, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0 if tty else 60.0,
                file=sys.stderr)


# --------------------------------------------------------------------- local multi-process (CPU)
def _spawn_worker(rank: int, world: int, port: int, cfg: Dict[str, Any], run_dir: str, resume: bool):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        train(cfg, run_dir, resume=resume, echo=lambda *a, **k: None)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def spawn_local(world: int, cfg: Dict[str, Any], run_dir, resume: bool = False):
    """Run ``train`` in ``world`` local processes (gloo on CPU), like ``torchrun --nproc-per-node``."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawn_worker, args=(world, port, cfg, str(run_dir), resume), nprocs=world, join=True)
