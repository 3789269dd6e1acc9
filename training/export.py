"""Export a training run to the plugin's bundled checkpoint format (``.safetensors``).

``python -m training export --run runs/brain2d --out src/napari_drdm/weights/brain2d_s128.safetensors``

The weights come from the run's latest checkpoint (or ``--checkpoint``); the configuration is
the run's ``model`` section as a :class:`DRDMConfig`; the provenance records the data (kit
manifest and per-file sha256s, prepared-file sha256), every command line of the run (first
training and each resume), steps, wall time, devices, git commit(s), the last validation
metrics and the full training configuration.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .checkpointing import latest_checkpoint, load_training_checkpoint
from .data import dataset, ensure_core
from .settings import model_config

ensure_core()

from napari_drdm.checkpoint import write_checkpoint  # noqa: E402

__all__ = ["export_run", "provenance_of", "pick_weights", "validate_run", "check_loadable"]


def pick_weights(ck: Dict[str, Any], weights: str = "auto") -> Tuple[str, Dict[str, Any]]:
    """The state dict to export: ``raw`` (trained), ``ema`` (the weight average), ``auto`` (ema if saved)."""
    if weights not in ("auto", "raw", "ema"):
        raise ValueError(f"weights must be auto, raw or ema, got {weights!r}")
    avg = ck.get("ema")
    if weights == "ema" and not avg:
        raise ValueError(f"the checkpoint of step {ck['step']} holds no weight average "
                         "(train with --set train.ema_decay=0.995, or export --weights raw)")
    if weights == "raw" or not avg:
        return "raw", ck["model"]
    return "ema", avg["state"]


def provenance_of(ck: Dict[str, Any], ckpt_path: Path, weights: str = "raw") -> Dict[str, Any]:
    hist = list(ck.get("history", []))
    avg = ck.get("ema") or {}
    data = dict(ck.get("data") or {})
    kit = data.pop("kit", None) or {}
    return {
        "trainer": "napari-drdm training (python -m training)",
        "checkpoint": ckpt_path.name,
        "steps": int(ck["step"]),
        "weights": weights,
        "ema": ({"decay": float(avg["decay"]), "updates": int(avg["updates"])} if weights == "ema" else None),
        "wall_time_s": float(ck.get("wall_s_total", 0.0)),
        "commands": [" ".join(h.get("argv", [])) for h in hist],
        "sessions": hist,
        "devices": sorted({h.get("device", "?") for h in hist}),
        "git_commits": sorted({h.get("git") or "unknown" for h in hist}),
        "torch": sorted({h.get("torch", "?") for h in hist}),
        "data": {
            "prepared_sha256": data.get("prepared_sha256"),
            "images_sha256": data.get("images_sha256"),
            "kind": data.get("kind"),
            "counts": data.get("counts"),
            "subsample": data.get("subsample"),
            "kit_manifest_sha256": kit.get("manifest_sha256"),
            "kit_files": kit.get("files"),
            "synthetic": data.get("synthetic") if data.get("kind") == "synthetic" else None,
        },
        "init": ck.get("init"),
        "final_validation": ck.get("last_val"),
        "training_config": ck.get("config"),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _validator(cfg: Dict[str, Any], mcfg, device: Optional[str] = None):
    """The run's :class:`Validator` on ``device`` (default: CUDA when present) and that device."""
    from .evaluate_hook import Validator
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = torch.bfloat16 if dev.type == "cuda" and cfg["train"].get("amp") in ("auto", "bf16") else None
    return Validator(mcfg, dataset(cfg)["val"], cfg["validation"], cfg["loss"], dev, amp), dev


def validate_checkpoint(ck: Dict[str, Any], device: Optional[str] = None, log=print,
                        weights: str = "auto") -> Dict[str, float]:
    """Run the configured validation on a training checkpoint's weights (on ``device``, default auto)."""
    from napari_drdm.core.network import DRDMNet
    cfg, mcfg = ck["config"], model_config(ck["config"])
    net = DRDMNet.from_config(mcfg)
    net.load_state_dict(pick_weights(ck, weights)[1])
    val, dev = _validator(cfg, mcfg, device)
    res = val.run(net.to(dev))
    res["step"] = int(ck["step"])
    log("validation: " + ", ".join(f"{k[4:]}={v:.4g}" for k, v in res.items() if k.startswith("val/")))
    return res


#: what ``validate --set`` may change: how the weights are judged, never the weights or their data
VALIDATE_OVERRIDABLE = ("validation.", "model.compose_padding", "model.image_interp", "model.input_padding",
                        "model.k_recursions")


def validate_run(run_dir, source: Optional[str] = None, checkpoint: Optional[str] = None, weights: str = "auto",
                 append: bool = False, step: Optional[int] = None, device: Optional[str] = None,
                 log=print, sets: Sequence[str] = ()) -> Dict[str, Any]:
    """Run a run's configured validation on some weights; optionally append the row to its log.

    Args:
        run_dir: the run folder (its ``config.yaml`` and checkpoints).
        source: other weights to validate on the run's images and settings (a file or a bundled
            name, loaded like ``init``: e.g. the starting weights of a fine-tuning run that was
            begun without ``validation.at_start``); None: a checkpoint of the run.
        checkpoint: a particular ``step_*.pt`` of the run (default: the latest).
        weights: for a checkpoint, ``auto``, ``ema`` or ``raw`` (see :func:`pick_weights`).
        append: add the row to ``train_log.jsonl`` (``"event": "validation"``, so the learning
            curves show it), marked with ``"added_by": "validate"`` and the weights' origin.
        step: the step to record (default: the checkpoint's, 0 for ``source``).
        device: ``cpu``/``cuda`` (default: CUDA when present).
        sets: ``KEY=VALUE`` overrides of the validation settings for this validation only, e.g.
            ``["validation.schedules=[paper, reference]", "validation.t_primes=[30, 45, 70]"]``;
            keys under ``validation.``, ``model.compose_padding``, ``model.image_interp``,
            ``model.input_padding`` and ``model.k_recursions`` (inference settings: the weights are the
            same; see :data:`VALIDATE_OVERRIDABLE`).  An appended row records them as ``"overrides"``.
    """
    import json

    import yaml

    from napari_drdm.core.network import DRDMNet

    from .init_weights import load_init
    from .settings import load_config
    sets = list(sets or ())
    for item in sets:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not any(key.startswith(k) if k.endswith(".") else key == k
                                      for k in VALIDATE_OVERRIDABLE):
            raise ValueError(f"--set {item!r}: validate takes KEY=VALUE with KEY under validation., "
                             f"or {' / '.join(k for k in VALIDATE_OVERRIDABLE if not k.endswith('.'))}")
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a training run (no config.yaml)")
    if source is not None:
        cfg = load_config(base=yaml.safe_load((run_dir / "config.yaml").read_text()), sets=sets)
        mcfg = model_config(cfg)
        net = DRDMNet.from_config(mcfg)
        info = load_init(net, source, str(cfg.get("init_inflate") or "centre"))
        which, origin, at = "external", {"source": str(source), "sha256": info["sha256"]}, 0
    else:
        path = _checkpoint_path(run_dir, checkpoint)
        ck = load_training_checkpoint(path)
        cfg = load_config(base=ck["config"], sets=sets) if sets else ck["config"]
        mcfg = model_config(cfg)
        which, state = pick_weights(ck, weights)
        net = DRDMNet.from_config(mcfg)
        net.load_state_dict(state)
        origin, at = {"checkpoint": Path(path).name}, int(ck["step"])
    val, dev = _validator(cfg, mcfg, device)
    t0 = time.time()
    res = val.run(net.to(dev))
    if which == "ema":
        res = {"val_ema/" + k[4:]: v for k, v in res.items()}
    row = dict(res, event="validation", weights=which, step=at if step is None else int(step),
               seconds=time.time() - t0, added_by="validate", **origin)
    if sets:
        row["overrides"] = sets
    log(f"validation ({which}, step {row['step']}): " + ", ".join(
        f"{k.split('/', 1)[1]}={v:.4g}" for k, v in res.items() if k.endswith(("folding_pct", "max_disp_pct", "ang"))))
    if append:
        with open(run_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return row


def _checkpoint_path(run_dir, checkpoint: Optional[str]) -> Path:
    """The checkpoint asked for (it must exist) or the run's latest; one line naming what is missing."""
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
        return Path(checkpoint)
    path = latest_checkpoint(run_dir)
    if path is None or not Path(path).exists():
        raise FileNotFoundError(f"no training checkpoint in {Path(run_dir) / 'checkpoints'}")
    return Path(path)


def export_run(run_dir, out, checkpoint: Optional[str] = None, overwrite: bool = False,
               name: Optional[str] = None, validate: bool = False, weights: str = "auto") -> Tuple[str, str]:
    """Write ``out`` from a run directory; returns (path, sha256).

    Args:
        run_dir: the run folder (its latest checkpoint unless ``checkpoint`` is given).
        out: the ``.safetensors`` file to write.
        checkpoint: a particular ``step_*.pt`` instead of the latest.
        overwrite: replace an existing ``out``.
        name: the model name recorded in the file (default: the run's ``name``).
        validate: run the validation now (useful when the run stopped on its time budget
            before a scheduled validation) and record it as the final validation.
        weights: ``auto`` (the weight average when the checkpoint holds one, training/ema.py),
            ``ema`` or ``raw`` (the trained weights).
    """
    path = _checkpoint_path(run_dir, checkpoint)
    ck = load_training_checkpoint(path)
    cfg = model_config(ck["config"])
    which, chosen = pick_weights(ck, weights)
    if validate:
        ck["last_val"] = validate_checkpoint(ck, weights=which)
    prov = provenance_of(ck, Path(path), which)
    cfg.extra = dict(cfg.extra, name=name or ck["config"].get("name"), trained_steps=int(ck["step"]))
    state = dict(chosen)
    sha = write_checkpoint(out, state, cfg, prov, overwrite=overwrite)
    return str(out), sha


def check_loadable(path: str):
    """Reload through the plugin's reader and load strictly into a fresh network."""
    from napari_drdm.checkpoint import read_checkpoint
    from napari_drdm.core.network import DRDMNet
    state, cfg, prov = read_checkpoint(path)
    net = DRDMNet.from_config(cfg)
    net.load_state_dict(state, strict=True)
    return cfg, prov, net.n_trainable()


def main_export(args) -> int:
    out, sha = export_run(args.run, args.out, args.checkpoint, args.overwrite, args.name, args.validate,
                          getattr(args, "weights", "auto"))
    cfg, prov, n = check_loadable(out)
    size_kb = Path(out).stat().st_size / 1024
    print(f"wrote {out} ({size_kb:.0f} KB, sha256 {sha}); {n} parameters, ndim={cfg.ndim}, S={cfg.size}, "
          f"field_scale={cfg.field_scale}, {prov['steps']} steps, {prov['wall_time_s'] / 3600:.2f} h, "
          f"{'the weight average' if prov['weights'] == 'ema' else 'the trained weights'}")
    return 0
