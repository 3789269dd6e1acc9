"""The DRDM model object: config + network + device, and generation on images of any size.

>>> from napari_drdm import load_model
>>> model = load_model()                           # the default 2D model (load_model(ndim=3): 3D)
>>> model = load_model("cmr2d")                    # bundled weights by name, or a path to a checkpoint
>>> res = model.generate(image, labels, t_prime=45, seed=0)
>>> res.image, res.labels, res.ddf, res.metrics

Images of any size and spacing are resampled to the model's isotropic S^d grid (centred,
padded with background to a square/cube in physical units), the deformation is generated there
and resized back to the original grid (displacements rescaled), and the original-resolution image
and labels are warped with it (paper Section 3.2; the grid mapping is :mod:`napari_drdm.model_grid`,
the fold guard's methods :mod:`napari_drdm.guard_modes`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from .checkpoint import CheckpointError, check_finite_state, file_sha256, read_checkpoint
from .checks import MAX_IMAGE_RANGE  # noqa: F401  (re-exported: the export code refers to model.MAX_IMAGE_RANGE)
from .checks import check_image as _check_image
from .checks import check_labels as _check_labels
from .core.background import extend_into_background
from .core.config import DEFAULT_SCHEDULE, DRDMConfig, Schedule
from .core.foldguard import guard_field
from .core.forward import ForwardSampler
from .core.generators import Returning
from .core.keep_size import apply_keep_size
from .core.metrics import field_metrics
from .core.network import DRDMNet
from .core.recovery import recover
from .core.spatial import warp, warp_labels
from .core.view import anatomy_views, field_from_view, to_view
from .errors import InputError
from .guard_modes import GUARD_MODES, GuardHooks, guard_mode
from .loop_options import resolve_anatomy_fit, resolve_background_margin, resolve_input_padding, resolve_keep_size
from .model_grid import ModelGrid
from .validate import (
    check_compose_padding,
    check_device,
    check_k,
    check_model_size,
    check_seed,
    check_t_prime,
)

__all__ = ["DRDM", "Frame", "GenerationResult", "ModelGrid", "load_model", "pick_device", "GUARD_MODES",
           "guard_mode", "resolve_background_margin", "resolve_anatomy_fit", "resolve_keep_size"]


def pick_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """cuda > mps > cpu unless told; ``"auto"`` or None means choose.

    Args:
        device: a device string or ``torch.device``; ``"auto"`` or None chooses.

    Raises:
        DeviceError: an unknown device, or one not present on this machine.
    """
    if device is not None and str(device) != "auto":
        if isinstance(device, torch.device):
            device = str(device)
        return torch.device(check_device(device, "device"))
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class Frame:
    """One displayable state: a forward frame (t' = 1..T') or a recovery step."""

    phase: str                     # "forward" or "recovery"
    index: int                     # 1-based within the phase
    total: int                     # frames in this phase
    t: int                         # diffusion time (forward: t'; recovery: t fed to the network)
    ddf: np.ndarray                # total field on the original grid, pixels, (d, *shape)
    image: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    metrics: Optional[Dict[str, float]] = None
    guard: Optional[Dict[str, Any]] = None   # fold guard on this frame: pixels folded before / changed
    background: Optional[Dict[str, Any]] = None  # the background extension (last recovery frame): margin, % replaced


@dataclass
class GenerationResult:
    image: np.ndarray                      # deformed image, original grid and dtype
    labels: Optional[np.ndarray]           # deformed labels (same values as the input), or None
    ddf: np.ndarray                        # recovered field phi, original grid, pixels (d, *shape)
    forward_ddf: np.ndarray                # psi_{T':1}, original grid, pixels
    metrics: Dict[str, float]              # of phi on the model grid (paper Table 1 protocol)
    forward_metrics: Dict[str, float]      # of psi_{T':1} on the model grid
    t_prime: int = 0
    seed: Optional[int] = None
    schedule: str = DEFAULT_SCHEDULE.value
    loop_extra: int = 0                    # steps the paper loop started above T' (the model's; 0: Algorithm 2)
    k: int = 2
    compose_padding: str = "zeros"         # how each reverse step was composed into the field
    input_padding: int = 0                 # px of mirrored image around the network's input at each step
    background_margin: Optional[int] = None  # px kept around the anatomy; the field beyond extended (None: off)
    background_replaced_pct: float = 0.0   # % of the model grid whose field the background extension replaced
    anatomy_fit: Optional[int] = None      # px kept around the anatomy in the fitted view (None: whole image)
    view_zoom: float = 1.0                 # how much the fitted view enlarged the image for the network
    keep_size: Union[bool, str] = False    # the final field's global zoom removed (core/keep_size.py): False, True, "inflation"
    zoom_removed: float = 1.0              # the zoom it took out (> 1: the anatomy had been inflated)
    frames: List[Frame] = field(default_factory=list)
    guard: Optional[Dict[str, Any]] = None  # fold guard: method, folds before, pixels changed (None: off)


class DRDM:
    """A loaded DRDM: network + configuration + device."""

    def __init__(self, net: DRDMNet, config: DRDMConfig, device=None, name: str = "",
                 sha256: str = "", provenance: Optional[Dict[str, Any]] = None, fast: bool = True):
        self.config = config
        self.device = pick_device(device)
        self.net = net.to(self.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.name = name
        self.sha256 = sha256
        self.provenance = provenance or {}
        self.sampler = ForwardSampler(config)
        self.fast = fast

    @property
    def fast(self) -> bool:
        """True (default): the optimised inference engine (core/fast.py) and the fast forward
        sampler, same numbers up to float rounding; False: the plain implementation."""
        return self._fast

    @fast.setter
    def fast(self, value: bool):
        self._fast = bool(value)
        self.sampler.fast = self._fast

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path, device=None, size: Optional[int] = None, name: str = "") -> "DRDM":
        state, cfg, prov = read_checkpoint(path, size=check_model_size(size, "size"))
        check_finite_state(state, path)
        net = DRDMNet.from_config(cfg)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit a {cfg.ndim}D DRDM network: "
                                  f"{str(e).splitlines()[0]}") from None
        return cls(net, cfg, device, name=name or Path(path).stem, sha256=file_sha256(path), provenance=prov)

    @property
    def ndim(self) -> int:
        return self.config.ndim

    @property
    def size(self) -> int:
        return self.config.size

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "ndim": self.ndim, "size": self.size,
                "device": str(self.device), "config": self.config.to_dict()}

    # ------------------------------------------------------------------ helpers
    def _net(self, x, t, k):
        if self._fast:
            return self.net.engine()(x, t, k)
        return self.net.forward_plain(x, t, k)

    def _seeded_draws(self, seeds: Sequence[int]):
        per = [self.sampler.draw(1, torch.Generator().manual_seed(int(s))) for s in seeds]
        return [torch.cat([p[i] for p in per], 0).to(self.device) for i in range(len(per[0]))]

    def prepare(self, image: np.ndarray, spacing=None):
        """Validate, normalise and resample an image to the model grid: (grid, model tensor (1,1,S..), min, max)."""
        a = _check_image(image, self.ndim)
        grid = ModelGrid.fit(a.shape, spacing, self.size)
        x = torch.as_tensor(a.astype(np.float32), device=self.device)[None, None]
        lo, hi = float(x.min()), float(x.max())
        xn = (x - lo) / (hi - lo + 1e-7)
        return grid, grid.to_model(xn), lo, hi

    def _render(self, grid: ModelGrid, ddf_model: torch.Tensor, x_orig: torch.Tensor, lo: float, hi: float,
                lab: Optional[torch.Tensor], image_interp: str, label_interp: str, fold_guard: bool = False):
        ddf = grid.field_to_original(ddf_model, fold_guard)
        img = warp(x_orig - lo, ddf, image_interp, "zeros") + lo
        img = img.clamp(lo, hi)
        labels = warp_labels(lab, ddf, label_interp) if lab is not None else None
        return ddf, img, labels

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def iter_generate(self, image: np.ndarray, labels: Optional[np.ndarray] = None, t_prime: int = 45,
                      seed: int = 0, schedule: Optional[str] = None, k: Optional[int] = None, spacing=None,
                      frames: bool = True, render: bool = True, frame_metrics: bool = False,
                      image_interp: Optional[str] = None, label_interp: str = "nearest",
                      fold_guard=False, compose_padding: Optional[str] = None,
                      input_padding: Optional[int] = None,
                      background_margin: Union[None, int, str] = None,
                      anatomy_fit: Union[None, int, str] = None,
                      keep_size: Union[None, bool, str] = None) -> Iterator[Frame]:
        """Yield forward frames (t' = 1..T') then one frame per reverse step; return a GenerationResult.

        With ``frames=False`` only the final result is computed (use :meth:`generate`).
        ``schedule``: the reverse loop, "paper" (T' steps) or "reference" (all T steps); None: the
        model's (``config.schedule``; :data:`~napari_drdm.core.config.DEFAULT_SCHEDULE`, "reference",
        unless the checkpoint says otherwise).  A model's paper loop starts ``config.loop_extra``
        steps above T' (0 unless the checkpoint says otherwise).
        ``compose_padding``: how each reverse step is composed into the accumulated field, "border"
        or "zeros" (the authors' 2D code); None: the model's (``config.compose_padding``).
        ``input_padding``: pixels of mirrored image around the network's input at every reverse
        step, a multiple of 4 below S/2 (0: the authors' behaviour); None: the model's
        (``config.input_padding``).
        ``background_margin``: pixels kept around the anatomy; farther out the recovered field is
        replaced by the harmonic extension of the field around it (core/background.py), "off" for
        none (the authors' behaviour); None: the model's (``config.background_margin``).  Applied
        to the final field, so the last recovery frame carries it and the frames before do not.
        ``anatomy_fit``: pixels kept around the anatomy when the model's view is fitted to it (the
        reverse loop runs on a square / cube around the anatomy, core/view.py; every field is
        returned on the whole image), "off" for the whole image (the authors' behaviour); None: the
        model's (``config.anatomy_fit``).
        ``keep_size``: True ("on") takes the final field's global zoom over the anatomy out (one
        similarity after the loop, core/keep_size.py: folds nothing), "inflation" only where the
        anatomy came out enlarged, False ("off") keeps it (the authors' behaviour); None: the
        model's (``config.keep_size``).  Every recovery frame's field
        gets its own (the explorer shows the anatomy at its size throughout); the forward frames
        are the forward field's.
        ``fold_guard``: True (or a method of :data:`GUARD_MODES`) makes the returned field and every
        recovery frame's field fold-free, on the model grid and on the image's own grid
        (core/foldguard.py); each frame then carries ``guard`` (pixels folded before, changed).
        """
        gmode = guard_mode(fold_guard)
        cfg = self.config
        schedule = Schedule.parse(schedule or cfg.schedule)
        k = check_k(k) or int(cfg.k_recursions)
        padding = check_compose_padding(compose_padding, "compose_padding") or cfg.compose_padding
        pad_in = resolve_input_padding(input_padding, cfg)
        margin = resolve_background_margin(background_margin, cfg)
        fit = resolve_anatomy_fit(anatomy_fit, cfg)
        keep = resolve_keep_size(keep_size, cfg)
        t_prime = check_t_prime(t_prime, cfg.n_steps)
        seed = check_seed(seed, "seed")
        image_interp = image_interp or cfg.image_interp
        a = _check_image(image, self.ndim)
        lab_np = _check_labels(labels, a.shape) if labels is not None else None
        grid, x_model, lo, hi = self.prepare(a, spacing)
        views = anatomy_views(x_model, fit) if fit is not None else None
        x_net = to_view(x_model, views) if views else x_model
        x_orig = torch.as_tensor(a.astype(np.float32), device=self.device)[None, None]
        lab = torch.as_tensor(lab_np.astype(np.int64), device=self.device)[None, None] if lab_np is not None else None

        draws = self._seeded_draws([seed])
        if not frames:
            psi = self.sampler.sample(t_prime, batch=1, draws=draws, return_step=False).forward_ddf

        def make_frame(phase, idx, total, t, ddf_m, background=None, on_grid=False):
            ddf_m = field_from_view(ddf_m, views) if views and not on_grid else ddf_m
            if phase == "recovery" and not on_grid:      # each frame at the anatomy's own size
                ddf_m = apply_keep_size(ddf_m, x_model, keep, cfg.image_interp)[0]
            ginfo = None
            if gmode is not None and phase == "recovery":
                ddf_m, rep = guard_field(ddf_m)
                ginfo = {"folded_px_before": rep.folded_before[0], "changed_px": rep.changed[0]}
            ddf, img, labs = (self._render(grid, ddf_m, x_orig, lo, hi, lab, image_interp, label_interp,
                                           ginfo is not None)
                              if render else (grid.field_to_original(ddf_m, ginfo is not None), None, None))
            met = field_metrics(ddf_m[0], side=self.size) if frame_metrics else None
            return Frame(phase, idx, total, t, ddf[0].cpu().numpy(),
                         img[0, 0].cpu().numpy() if img is not None else None,
                         labs[0, 0].cpu().numpy() if labs is not None else None, met, ginfo, background)

        if frames:          # frames as the forward pass integrates them: the first one comes at once
            fwd_frames = Returning(self.sampler.iter_frames(t_prime, draws))
            for i, f in enumerate(fwd_frames, start=1):
                yield make_frame("forward", i, t_prime, i, f)
            psi = fwd_frames.value
        phi = psi
        hooks = GuardHooks(gmode)
        last = None                 # the last recovery frame waits for the background extension and keep_size
        if t_prime > 0 or schedule is Schedule.REFERENCE:
            steps = recover(self._net, x_net, psi, t_prime, **cfg.recover_options(schedule, k, padding, pad_in),
                            **hooks.kwargs())
            for fr in steps:
                phi = fr.ddf
                if frames:
                    if (margin is not None or keep) and fr.step == fr.n_steps:
                        last = fr
                    else:
                        yield make_frame("recovery", fr.step, fr.n_steps, fr.t, phi)
        replaced = [0.0]
        if margin is not None:
            phi, replaced = _extend_background(phi, x_net, margin, cfg.image_interp)
        if views:
            phi, psi = field_from_view(phi, views), field_from_view(psi, views)
        phi, removed = apply_keep_size(phi, x_model, keep, cfg.image_interp)
        if last is not None:
            info = {"margin": margin, "replaced_pct": replaced[0]} if margin is not None else None
            yield make_frame("recovery", last.step, last.n_steps, last.t, phi, info, on_grid=True)
        guard_info = None
        if gmode is not None:
            phi, guard_info = hooks.finish(phi, self.size)
        ddf, img, labs = self._render(grid, phi, x_orig, lo, hi, lab, image_interp, label_interp, gmode is not None)
        out_img = img[0, 0].cpu().numpy()
        if np.issubdtype(a.dtype, np.integer):
            info = np.iinfo(a.dtype)
            out_img = np.clip(np.rint(out_img), info.min, info.max)
        out_img = out_img.astype(a.dtype, copy=False)
        out_lab = labs[0, 0].cpu().numpy().astype(lab_np.dtype) if labs is not None else None
        return GenerationResult(
            image=out_img, labels=out_lab, ddf=ddf[0].cpu().numpy(),
            forward_ddf=grid.field_to_original(psi)[0].cpu().numpy(),
            metrics=field_metrics(phi[0], side=self.size), forward_metrics=field_metrics(psi[0], side=self.size),
            t_prime=t_prime, seed=seed, schedule=schedule.value,
            loop_extra=cfg.loop_extra_for(schedule), k=k, compose_padding=padding, input_padding=pad_in,
            background_margin=margin, background_replaced_pct=replaced[0], anatomy_fit=fit,
            view_zoom=views[0].zoom if views else 1.0, keep_size=keep, zoom_removed=removed[0], guard=guard_info)

    def generate(self, image: np.ndarray, labels: Optional[np.ndarray] = None, t_prime: int = 45,
                 seed: int = 0, schedule: Optional[str] = None, k: Optional[int] = None, spacing=None,
                 return_frames: bool = False, label_interp: str = "nearest",
                 image_interp: Optional[str] = None, fold_guard=False,
                 compose_padding: Optional[str] = None, input_padding: Optional[int] = None,
                 background_margin: Union[None, int, str] = None,
                 anatomy_fit: Union[None, int, str] = None,
                 keep_size: Union[None, bool, str] = None) -> GenerationResult:
        """Algorithm 2 on one image (2D or 3D, any size); returns a :class:`GenerationResult`.

        ``fold_guard``, ``compose_padding``, ``input_padding``, ``background_margin``, ``anatomy_fit``,
        ``keep_size``: see
        :meth:`iter_generate` (fold guard on: ``res.ddf`` is fold-free on the image's grid;
        ``res.compose_padding``, ``res.input_padding`` and ``res.background_margin`` say which
        settings were used).
        """
        gen = Returning(self.iter_generate(image, labels, t_prime=t_prime, seed=seed, schedule=schedule, k=k,
                                           spacing=spacing, frames=return_frames, label_interp=label_interp,
                                           image_interp=image_interp, fold_guard=fold_guard,
                                           compose_padding=compose_padding, input_padding=input_padding,
                                           background_margin=background_margin, anatomy_fit=anatomy_fit,
                                           keep_size=keep_size))
        collected: List[Frame] = list(gen)
        res = gen.value
        res.frames = collected
        return res

    @torch.inference_mode()
    def generate_model_grid(self, x_model: torch.Tensor, t_prime: int, seeds: Sequence[int],
                            schedule: Optional[str] = None, k: Optional[int] = None, fold_guard=False,
                            guard_report: Optional[dict] = None, compose_padding: Optional[str] = None,
                            input_padding: Optional[int] = None, background_margin: Union[None, int, str] = None,
                            background_report: Optional[dict] = None,
                            anatomy_fit: Union[None, int, str] = None, view_report: Optional[dict] = None,
                            keep_size: Union[None, bool, str] = None, size_report: Optional[dict] = None):
        """Batched generation on images already on the model grid: x_model (B, 1, S...) in [0, 1].

        Returns (phi, psi) pixel fields on the model grid, (B, d, S...).  Sample b uses seed
        ``seeds[b]`` for its forward draw, so results do not depend on the batch composition
        (up to float rounding).  ``fold_guard``: phi is fold-free on the model grid (resize it with
        ``ModelGrid.field_to_original(..., fold_guard=True)``); ``guard_report``, a dict, receives
        what the guard did (see :class:`~napari_drdm.guard_modes.GuardHooks`); ``compose_padding``:
        "border" or "zeros", None the model's (see :meth:`iter_generate`); ``input_padding``: pixels of
        mirrored image around the network's input (``DRDMConfig.input_padding``), None the model's;
        ``background_margin``: see :meth:`iter_generate`; ``background_report``, a dict, receives the
        margin used (``"margin"``, None: off) and each sample's share of the grid replaced
        (``"replaced_pct"``); ``anatomy_fit``: see :meth:`iter_generate` (both fields are returned on
        the whole grid); ``view_report``, a dict, receives the margin used (``"fit"``, None: off) and
        each sample's view zoom (``"zoom"``, 1: the whole grid); ``keep_size``: see
        :meth:`iter_generate`; ``size_report``, a dict, receives whether it was on (``"keep_size"``)
        and each sample's zoom taken out (``"zoom_removed"``, 1.0 when off).
        """
        gmode = guard_mode(fold_guard)
        hooks = GuardHooks(gmode)
        cfg = self.config
        schedule = Schedule.parse(schedule or cfg.schedule)
        k = check_k(k) or int(cfg.k_recursions)
        padding = check_compose_padding(compose_padding, "compose_padding")
        pad_in = resolve_input_padding(input_padding, cfg)
        margin = resolve_background_margin(background_margin, cfg)
        fit = resolve_anatomy_fit(anatomy_fit, cfg)
        keep = resolve_keep_size(keep_size, cfg)
        t_prime = check_t_prime(t_prime, cfg.n_steps)
        seeds = [check_seed(v, "seed") for v in seeds]
        if x_model.shape[0] != len(seeds):
            raise InputError(f"{x_model.shape[0]} images but {len(seeds)} seeds")
        draws = self._seeded_draws(seeds)
        psi = self.sampler.sample(int(t_prime), batch=len(seeds), draws=draws, return_step=False).forward_ddf
        phi = psi
        x_model = x_model.to(self.device)
        views = anatomy_views(x_model, fit) if fit is not None else None
        x_net = to_view(x_model, views) if views else x_model
        for fr in recover(self._net, x_net, psi, int(t_prime),
                          **cfg.recover_options(schedule, k, padding, pad_in),
                          **hooks.kwargs()):
            phi = fr.ddf
        replaced = [0.0] * len(seeds)
        if margin is not None:
            phi, replaced = _extend_background(phi, x_net, margin, cfg.image_interp)
        if background_report is not None:
            background_report.update(margin=margin, replaced_pct=replaced)
        if views:
            phi, psi = field_from_view(phi, views), field_from_view(psi, views)
        if view_report is not None:
            view_report.update(fit=fit, zoom=[v.zoom for v in views] if views else [1.0] * len(seeds))
        phi, removed = apply_keep_size(phi, x_model, keep, cfg.image_interp)
        if size_report is not None:
            size_report.update(keep_size=keep, zoom_removed=removed)
        if gmode is not None:
            phi, info = hooks.finish(phi, self.size)
            if guard_report is not None:
                guard_report.update(info)
        return phi, psi


def _extend_background(phi: torch.Tensor, x_model: torch.Tensor, margin: int, interp: str):
    """``phi`` with its empty background replaced (core/background.py) and each sample's share of
    the grid replaced, in %."""
    new, free = extend_into_background(phi, x_model, margin, image_interp=interp)
    return new, [100.0 * float(f.float().mean()) for f in free]


def load_model(name_or_path: Union[str, Path, None] = None, device=None, size: Optional[int] = None,
               ndim: int = 2) -> DRDM:
    """Load bundled weights by name (see ``drdm weights``) or a checkpoint file.

    With no name, the default bundled model for ``ndim``-dimensional images (``drdm weights``
    marks it).

    Accepted files: the project's ``.safetensors`` and the reference implementation's ``.pth``
    state_dicts (loaded with ``weights_only=True``: a weights file cannot run code).  ``size``
    overrides the model side S (useful for reference checkpoints, which do not record it).
    """
    from .weights import default_weights, resolve_weights

    path, name = resolve_weights(default_weights(ndim) if name_or_path is None else name_or_path)
    return DRDM.from_checkpoint(path, device=device, size=size, name=name)
