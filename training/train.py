"""The DRDM training loop (paper Algorithm 1).

Per step and sample: t ~ U{0..T-1}; (psi_{t:1}, psi_t) from the forward sampler (pixels, float32);
I_t = warp(I0, psi_{t:1}) (bilinear, zeros); psi_hat = net(I_t, t, K); loss =
drdm_losses(psi_hat, psi_t / S) = dist + ang + 10 reg (+ true_negdet_weight * relu(-det(I + grad)))
and an Adam step.  With ``model.input_padding`` > 0 the network reads I_t as the reverse loop then
feeds it, surrounded by that many pixels of mirrored image, its estimate cropped back
(core/recovery.py ``padded_estimate``).  CPU or CUDA (bf16 autocast on the network only); several processes with
``torchrun`` (DistributedDataParallel, nccl on CUDA, gloo on CPU).  Each rank has its own RNG
streams; rank 0 logs and checkpoints.  A checkpoint holds everything needed to continue exactly
(model, optimiser, step, every rank's generator states, the data sampler position).

Files in the run directory: ``config.yaml`` (the effective configuration), ``train_log.jsonl``
(one JSON object per logged step / validation), ``checkpoints/step_XXXXXXXX.pt`` (``torch.load(
weights_only=True)`` compatible, training/checkpointing.py).

Around the loop: the process placement and collectives (training/distributed.py), the random
streams (training/streams.py), the starting weights (training/init_weights.py), the data
(training/data.py, training/batches.py); one step's batch and loss (training/objective.py).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from .checkpointing import CKPT_FORMAT, checkpoint_path, git_commit, latest_checkpoint, load_training_checkpoint, plain, save_atomic
from .data import SliceBank, dataset, ensure_core, prepared_info
from .distributed import Env
from .ema import start_average, validation_weights
from .evaluate_hook import ValidationCancelled, Validator
from .init_weights import InitError, load_init, scale_head  # noqa: F401  (InitError re-exported)
from .objective import loss_terms, training_batch
from .pulls import anchor_weights, edge_window, teacher_augment, teacher_net, teacher_term
from .settings import DEFAULTS, load_config, model_config  # noqa: F401  (re-exported)
from .streams import generators, rng_state, set_rng_state

ensure_core()

from napari_drdm.core.forward import ForwardSampler  # noqa: E402
from napari_drdm.core.network import DRDMNet  # noqa: E402
from napari_drdm.core.recovery import padded_estimate  # noqa: E402

__all__ = ["DEFAULTS", "load_config", "model_config", "train", "spawn_local", "latest_checkpoint",
           "load_training_checkpoint"]


class _Log:
    """``train_log.jsonl``: one JSON object per line, flushed at once (rank 0 only; None: a no-op)."""

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
    S, K, dev = mcfg.size, mcfg.k_recursions, env.device
    pad_in = int(mcfg.input_padding)      # the reverse loop's mirrored frame, seen in training too

    data = dataset(cfg, env)
    bank = SliceBank(data["train"], int(tcfg["batch_size"]), device=dev, seed=int(tcfg["seed"]),
                     rank=env.rank, world=env.world)
    torch.manual_seed(int(tcfg["seed"]))
    model = DRDMNet.from_config(mcfg).to(dev)
    init_info = None
    if ck is None and cfg.get("init"):
        init_info = load_init(model, cfg["init"], str(cfg.get("init_inflate") or "centre"),
                              str(cfg.get("init_weights") or "raw"))
        say(f"initialised from {init_info['source']} (sha256 {init_info['sha256'][:12]}...)")
    elif ck is None:
        scale_head(model, float(ocfg.get("head_init_scale", 1.0)))
    anchor = anchor_weights(cfg, mcfg, dev, say)
    teacher = teacher_net(cfg, mcfg, dev, say)
    t_aug, t_batch = (teacher_augment(cfg), int(lcfg.get("teacher_batch", 2))) if teacher is not None else (None, 0)
    t_edge = (int(lcfg.get("teacher_edge_px") or 0), float(lcfg.get("teacher_edge_floor", 0.5)))
    t_window = (edge_window((mcfg.size,) * mcfg.ndim, *t_edge, device=dev)      # the same for every step
                if teacher is not None and t_edge[0] else None)
    layout = torch.channels_last_3d if mcfg.ndim == 3 else torch.channels_last
    if env.channels_last:       # before the optimiser: its moments take the parameters' layout
        model = model.to(memory_format=layout)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=float(ocfg["lr"]),
                           betas=tuple(ocfg["betas"]), weight_decay=float(ocfg["weight_decay"]))
    gens = generators(int(tcfg["seed"]), env.rank, dev)
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
        # the streams continue only in the layout they were saved in: same world size, batch and
        # device type (a CUDA generator's state cannot seed a CPU one; checkpoints before
        # `device_type` was recorded tell it by the CUDA state they carry)
        saved_dev = ck.get("device_type", "cuda" if "cuda" in ck["rng"][0] else "cpu")
        moved = [f"{what} {a} -> {b}" for what, a, b in (
            ("world size", int(ck["world_size"]), env.world), ("batch", ck.get("batch_size"), int(tcfg["batch_size"])),
            ("device", saved_dev, dev.type)) if a != b]
        if not moved:
            set_rng_state(gens, ck["rng"][env.rank], dev)
        else:  # a different layout cannot continue the same streams: reseed deterministically
            say(f"note: checkpoint written with another layout ({', '.join(moved)}): random streams reseeded")
            gens = generators(int(tcfg["seed"]) + step, env.rank, dev)
        _compare_data(ck.get("data") or {}, data, say)
        say(f"resumed {ckpt_path} at step {step}")
    ema = start_average(tcfg, model, ck, step, env.main, say)
    net = model
    if env.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if dev.type == "cuda" else None)
    sampler = ForwardSampler(mcfg)
    validator = Validator(mcfg, data["val"], cfg["validation"], lcfg, dev, env.autocast_dtype) if env.main else None
    log = _Log(run_dir / "train_log.jsonl" if env.main else None)
    entry = {"argv": list(argv if argv is not None else sys.argv), "start_step": step, "device": env.describe(),
             "world_size": env.world, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_commit(),
             "torch": torch.__version__, "prepared_sha256": data["sha256"],
             "ema_decay": ema.decay if ema is not None else None}
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
    # a validation takes minutes on a CPU: a single process abandons it at once on SIGTERM
    val_stop = None if env.distributed else (lambda: stop["signal"] is not None)

    max_min = cfg["budget"].get("max_minutes")
    target, log_every = int(tcfg["steps"]), max(int(tcfg["log_every"]), 1)
    ck_every, v_every = int(tcfg["checkpoint_every"]), int(cfg["validation"].get("every") or 0)
    clip, warm, base_lr = float(ocfg.get("grad_clip") or 0.0), int(ocfg.get("warmup_steps") or 0), float(ocfg["lr"])
    acc: Optional[torch.Tensor] = None      # running sums on the device (no host sync per step)
    keys: List[str] = []
    n_acc, n_skip, t_int, reason = 0, 0, time.time(), "steps"
    bar = _progress(env.main, step, target)
    first_step = step

    def save(tag: str):
        states = env.gather(rng_state(gens, dev))
        if env.main:
            now = dict(entry, end_step=step, wall_s=time.time() - t_start, stop_reason=tag)
            obj = {"format": CKPT_FORMAT, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                   "bank": bank.state_dict(), "rng": states, "world_size": env.world, "device_type": dev.type,
                   "batch_size": int(tcfg["batch_size"]), "config": plain(cfg), "model_config": plain(mcfg.to_dict()),
                   "history": plain(history + [now]), "data": plain(prepared_info(data)),
                   "last_val": plain(last_val), "init": plain(init_info),
                   "ema": ema.state_dict() if ema is not None else None,
                   "wall_s_total": wall_before + time.time() - t_start}
            save_atomic(obj, checkpoint_path(run_dir, step), int(tcfg["keep_checkpoints"]))
        env.barrier()

    fixed: Dict[str, Any] = {}   # train.overfit_batch: the first batch, reused at every step

    def estimate(network, images, t):
        return padded_estimate(network, images, t, K, pad_in) if pad_in else network(images, t, k=K)

    def forward_backward():
        if fixed:
            x0, t, fs, img_t = fixed["batch"]
        else:
            x0, t, fs, img_t = training_batch(bank, sampler, cfg["augment"], gens, mcfg, dev,
                                              image_padding=lcfg["image_padding"])
            if tcfg.get("overfit_batch"):
                fixed["batch"] = (x0, t, fs, img_t)
        net_in, tt = img_t, t.to(dev, non_blocking=True)
        if teacher is not None:     # one forward pass over both batches (DDP allows one per backward)
            _, t2, _, img2 = training_batch(bank, sampler, t_aug, gens, mcfg, dev,
                                            image_padding=lcfg["image_padding"], n=t_batch)
            t2 = t2.to(dev, non_blocking=True)
            with torch.no_grad(), env.autocast():
                psi_ref = estimate(teacher, img2, t2)
            net_in, tt = torch.cat([net_in, img2]), torch.cat([tt, t2])
        net_in = net_in.contiguous(memory_format=layout) if env.channels_last else net_in
        with env.autocast():
            psi_all = estimate(net, net_in, tt)
        B = img_t.shape[0]
        psi_hat = psi_all[:B]
        terms = loss_terms(psi_hat, fs, S, lcfg)
        if anchor:
            terms["anchor"] = float(lcfg["w_anchor"]) * sum(((p.float() - a) ** 2).sum()
                                                            for p, a in zip(model.parameters(), anchor))
            terms["total"] = terms["total"] + terms["anchor"]
        if teacher is not None:
            terms["teacher"] = teacher_term(psi_all[B:], psi_ref, float(lcfg["w_teacher"]), t_window)
            terms["total"] = terms["total"] + terms["teacher"]
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        return terms, x0.shape[0]

    at_end = bool(cfg["validation"].get("at_end"))
    val = {"s": 0.0, "step": None}     # the last validation's wall time in this process, and its step

    def validate_now():
        nonlocal last_val
        t0 = time.time()
        last_val = _validate(validator, model, step, log, say, env, ema, cfg["validation"], val_stop, last_val)
        val["s"], val["step"] = time.time() - t0, step

    if ck is None and cfg["validation"].get("at_start"):     # the starting weights, for reference
        validate_now()
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
            if ema is not None:
                ema.update(model)
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
        if v_every and step % v_every == 0:
            validate_now()
        # the budget keeps the last validation's duration for the one at the end (measured in this process)
        spent = time.time() - t_start + (val["s"] if at_end else 0.0)
        over = max_min is not None and spent / 60.0 >= float(max_min)
        if env.any_flag(over or stop["signal"] is not None) and step < target:
            reason = "signal" if stop["signal"] is not None else "budget"
            break
        if ck_every and step % ck_every == 0 and step < target:
            save("periodic")
    # validation.at_end: the weights the run stops with (at its last step or at its budget) are validated,
    # so the curves end where the weights do; not on a signal (a prompt stop), nor when no step ran here
    if at_end and reason != "signal" and step > first_step and val["step"] != step:
        validate_now()
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


def _compare_data(saved: Dict[str, Any], data: Dict[str, Any], say):
    """Say whether a resumed run trains on the images its checkpoint was trained on.  The images'
    own hash decides where both sides have one (a prepared file rebuilt from the same kit on
    another machine may differ in its metadata only); older checkpoints have only the file's."""
    if saved.get("images_sha256") and data.get("images_sha256"):
        if saved["images_sha256"] != data["images_sha256"]:
            say("WARNING: the training images differ from the checkpoint's (images sha256 mismatch)")
        elif saved.get("prepared_sha256") != data["sha256"]:
            say("note: the prepared file differs from the checkpoint's in its metadata only (same images)")
    elif saved.get("prepared_sha256") != data["sha256"]:
        say("WARNING: the prepared data differ from the checkpoint's (file sha256 mismatch; the checkpoint "
            "predates the images' own hash, so the images were not compared)")


class _StepAborted(Exception):
    """Raised by the SIGTERM handler to abandon the step in flight (single process only)."""


def _validate(validator, model, step, log, say, env, ema=None, vcfg=None, should_stop=None, last=None):
    """Validate the trained weights (``val/...``) and/or their average (``val_ema/...``).

    ``should_stop`` (single process): checked between reverse-loop steps; when it turns True the
    validation is abandoned (a "validation_cancelled" log event, nothing else logged for the
    weights in flight) and ``last``, the previous result, is returned."""
    res = None
    if validator is not None and validator:
        res = {}
        raw_out = None
        for which in validation_weights(vcfg or {}, ema):
            t0 = time.time()
            try:
                if which == "ema" and raw_out is not None and _same_weights(model, ema.module):
                    out = dict(raw_out)         # the average still is the weights (step 0): not run twice
                else:
                    out = validator.run(ema.module if which == "ema" else model, should_stop=should_stop)
                    raw_out = dict(out) if which == "raw" else raw_out
            except ValidationCancelled:
                log.write({"event": "validation_cancelled", "step": step, "weights": which,
                           "seconds": time.time() - t0})
                say(f"validation ({which}) @{step} abandoned: stop requested")
                return last
            if which == "ema":
                out = {"val_ema/" + k[4:]: v for k, v in out.items()}
                out["ema_updates"] = ema.updates
            out["step"] = step
            log.write(dict(out, event="validation", weights=which, seconds=time.time() - t0))
            say(f"val ({which}) @{step}: " + ", ".join(
                f"{k.split('/', 1)[1]}={v:.3g}" for k, v in out.items()
                if k.endswith(("total", "folding_pct", "mean_disp_pct"))))
            res.update(out)
    env.barrier()
    return res


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when the two modules hold bit-identical states (same keys, same tensors)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


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
