"""Forward process ("deformation diffusion"), exactly as the reference implementation does it.

One multi-scale Gaussian field per sample on a 64-point
control grid covering twice the image, a warped 8 % disturbance, forward-Euler integration by
repeated self-composition (n_{t:1} times for the forward DDF, n_t times for the one-step label),
then scaling, upsampling to 2S and a centre crop.

Fields returned by :class:`ForwardSampler` are in **pixels of the model grid** (see
:mod:`napari_drdm.core.spatial`); ``*_frac`` helpers give the reference units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .config import DRDMConfig
from .spatial import frac_to_px, sampling_grid, warp

__all__ = ["schedule_counts", "ForwardSample", "ForwardSampler", "LazyFrames"]


def schedule_counts(t, alpha: float = 0.6, beta: float = 1.3, max_compositions: int = 200):
    """(n_t, n_{t:1}) for integer t (scalar or sequence), evaluated as the reference does:

    float32 powers of the integer t, ``n_t = floor(t^alpha)``,
    ``n_{t:1} = clamp((2 * t^beta) // 3, 1, max_compositions)``.  float32 gets t = 32 right
    (32^0.6 = 8 exactly); float64 would give 7.
    """
    tt = torch.as_tensor(t, dtype=torch.int64)
    tf = tt.to(torch.float32)
    nt = torch.floor(tf ** alpha).to(torch.int64)
    nt1 = torch.clamp(torch.floor_divide(2 * tf ** beta, 3).to(torch.int64), 1, max_compositions)
    return nt, nt1


@dataclass
class ForwardSample:
    """Output of one forward-process call (pixel units of the model grid)."""

    forward_ddf: torch.Tensor               # psi_{t:1}, (B, d, S, ...)
    step_ddf: Optional[torch.Tensor]        # psi_t, the one-step field the network learns to undo
    t: torch.Tensor                         # (B,) int64
    frames: Optional[Sequence[torch.Tensor]] = None   # psi_{t':1} for t' = 1..max(t) (B, d, S...) each
                                                      # (a list, or LazyFrames from a fast sampler)
    grid: Optional[Dict[str, torch.Tensor]] = None  # 64-grid intermediates (v, noise_field, v0, D64, d64)


class LazyFrames(Sequence):
    """Forward frames psi_{t':1} (t' = 1..T'), each converted from the control grid to the image
    grid when it is read and not kept: a 128^3 frame is 25 MB, all 79 of them 2 GB, while
    the control-grid states they come from are 3 MB each.  Reading a frame twice converts it twice."""

    def __init__(self, states: List[torch.Tensor], convert):
        self._states = states
        self._convert = convert

    def __len__(self) -> int:
        return len(self._states)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._convert(s) for s in self._states[i]]
        return self._convert(self._states[i])

    def __iter__(self):
        for s in self._states:
            yield self._convert(s)


class ForwardSampler:
    """Seedable forward sampler.  ``draws`` may be injected (the golden tests feed stored draws).

    ``fast=True`` (default) takes the cheaper routes that give the same numbers (see
    :meth:`integrate` and :meth:`to_image`) and returns frames lazily (:class:`LazyFrames`);
    ``fast=False`` runs the plain implementation.
    """

    def __init__(self, config: DRDMConfig, fast: bool = True):
        self.config = config
        self.fast = bool(fast)

    # ----- random draws ---------------------------------------------------------------------
    def draw(self, batch: int, generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """8 standard-normal tensors in the reference order: clean s=64,32,16,8 then noise s=64..8.

        Drawn on the CPU (so a seed gives the same field on every device), float32.
        """
        cfg = self.config
        out = []
        for _ in range(2):
            for s in cfg.scales:
                out.append(torch.randn((batch, cfg.ndim) + (s,) * cfg.ndim, generator=generator,
                                       dtype=torch.float32))
        return out

    def multiscale(self, draws: Sequence[torch.Tensor], amplitude: float) -> torch.Tensor:
        """sum_s interpolate(((z_s * amplitude) * c) / s, size=c): the paper's eq. 6, m = 3."""
        cfg = self.config
        c = cfg.control_grid
        mode = "bilinear" if cfg.ndim == 2 else "trilinear"
        field = None
        for z, s in zip(draws, cfg.scales):
            comp = F.interpolate(((z * amplitude) * c) / s, size=(c,) * cfg.ndim, mode=mode, align_corners=False)
            field = comp if field is None else field + comp
        return field

    def base_fields(self, draws: Sequence[torch.Tensor]):
        """v (clean), noise_field, v0 = v + noise(x + v(x)) on the control grid (fraction units)."""
        cfg = self.config
        n = len(cfg.scales)
        v = self.multiscale(draws[:n], cfg.sigma)
        noise = self.multiscale(draws[n:], cfg.sigma * cfg.noise_ratio)
        c = cfg.control_grid
        v0 = v + warp(noise, frac_to_px(v, c), "linear", cfg.sampler_padding)
        return v, noise, v0

    def integrate(self, field: torch.Tensor, counts: torch.Tensor, keep_at: Optional[Sequence[int]] = None):
        """Self-compose ``field`` ``counts[b]`` times per sample (forward Euler of a stationary flow).

        Returns the integrated field (control-grid fraction units) and, if ``keep_at`` is given,
        the states after each number of compositions listed there (sorted ascending).
        Samples whose count is reached are left untouched (the reference instead resamples them by
        an identity field, a difference of about 1e-7 against the reference's stored fields).
        """
        if self.fast:
            return self._integrate_fast(field, counts, keep_at)
        cfg = self.config
        c = cfg.control_grid
        counts = counts.to(torch.int64).cpu()
        total = int(counts.max()) if counts.numel() else 0
        acc = torch.zeros_like(field)
        kept = {}
        want = sorted(set(int(k) for k in keep_at)) if keep_at is not None else []
        if 0 in want:
            kept[0] = acc.clone()
        field_px = frac_to_px(field, c)
        for j in range(total):
            active = counts > j
            if bool(active.all()):
                acc = field + warp(acc, field_px, "linear", cfg.sampler_padding)
            elif field.device.type == "cpu":
                idx = torch.nonzero(active).flatten()
                upd = field[idx] + warp(acc[idx], field_px[idx], "linear", cfg.sampler_padding)
                acc = acc.index_copy(0, idx, upd)
            else:  # accelerators: full-batch update + mask, no host sync or gather per iteration
                mask = active.to(field.device).view(-1, *([1] * (field.dim() - 1)))
                acc = torch.where(mask, field + warp(acc, field_px, "linear", cfg.sampler_padding), acc)
            if (j + 1) in want:
                kept[j + 1] = acc
        return acc, kept

    def _integrate_fast(self, field: torch.Tensor, counts: torch.Tensor, keep_at: Optional[Sequence[int]] = None):
        """:meth:`integrate` with the same numbers, cheaper:

        * the sampling grid of ``field`` is built once: every composition resamples the running
          field at x + field(x), the same grid each time (plain ``warp`` rebuilt it n times);
        * the first composition, of the zero field, is ``field + 0``: skipped (``field`` itself);
        * the samples are taken in descending order of their counts, so the ones still running
          are always the first k: each composition reads and writes that prefix in place, with no
          gather, scatter or mask of the whole batch, and a batch costs the sum of its counts,
          not its size times the largest (a permutation at the start and at the end when the
          counts are not already in that order).
        Repeated squaring would need only log2(n) compositions but is not the same computation
        with bilinear resampling (benchmarks/README.md quantifies it); it is not used.
        """
        kept = {}
        acc = torch.zeros_like(field)
        for n, acc in self._iter_integrate_fast(field, counts, keep_at):
            if n is not None:
                kept[n] = acc
        return acc, kept

    def _iter_integrate_fast(self, field: torch.Tensor, counts: torch.Tensor, keep_at: Optional[Sequence[int]] = None):
        """Generator behind :meth:`_integrate_fast`: yields ``(n, state)`` as soon as the state after
        ``n`` compositions (``n`` in ``keep_at``) exists, then ``(None, final state)``.  Every
        yielded state is a tensor of its own (later compositions do not change it)."""
        cfg = self.config
        counts = counts.to(torch.int64).cpu()
        total = int(counts.max()) if counts.numel() else 0
        want = set(int(k) for k in keep_at) if keep_at is not None else set()
        if 0 in want:
            yield 0, torch.zeros_like(field)
        if total == 0:
            yield None, torch.zeros_like(field)
            return
        # descending counts (stable): the samples still running at composition j are a prefix
        order = torch.argsort(-counts, stable=True)
        permuted = not bool(torch.equal(order, torch.arange(counts.numel())))
        if permuted:
            dev_order = order.to(field.device)
            field = field.index_select(0, dev_order)
            counts = counts[order]
            back = torch.argsort(order).to(field.device)
        grid = sampling_grid(frac_to_px(field, cfg.control_grid)).to(field.dtype)
        running = [int((counts > j).sum()) for j in range(total)]   # host counts: no device sync

        def state(x: torch.Tensor) -> torch.Tensor:
            return x.index_select(0, back) if permuted else x.clone()

        acc = field.clone()                 # composition 1: field + field(x + 0) = field
        acc[running[0]:] = 0                # samples with no composition stay at zero
        if 1 in want:
            yield 1, state(acc)
        for j in range(1, total):           # composition j + 1, for the samples whose count is > j
            k = running[j]
            head = acc[:k]
            head.copy_(field[:k] + F.grid_sample(head, grid[:k], mode="bilinear",
                                                 padding_mode=cfg.sampler_padding, align_corners=True))
            if (j + 1) in want:
                yield j + 1, state(acc)
        yield None, (acc.index_select(0, back) if permuted else acc)

    def _to_image_crop(self, grid_field: torch.Tensor, S: int) -> torch.Tensor:
        """:meth:`to_image` without building the 2S^d upsampled field.

        align_corners=False upsampling from c to 2S points reads source coordinate
        (i + 0.5) * c / (2S) - 0.5 for output index i; the kept block i in [S/2, 3S/2) reads
        only source points ~c/4 .. 3c/4.  Upsampling just that slab [r0, r1) by the same scale
        factor gives the same coordinates shifted by r0 when r0 * 2S / c is an integer, so the
        same interpolation weights: bit-identical when 2S / c is a power of two (S = 64, 128,
        256, ... with c = 64), otherwise equal up to float rounding of the scale.  In 3D at
        S = 128 this avoids a 200 MB intermediate per frame.
        """
        cfg = self.config
        nd = cfg.ndim
        c = grid_field.shape[2]
        m = 2.0 * S / c
        step = c // math.gcd(2 * S, c)          # r0 must be a multiple of this
        lo_src = (S // 2 + 0.5) / m - 0.5
        hi_src = (S // 2 + S - 0.5) / m - 0.5
        r0 = max(0, (int(math.floor(lo_src)) // step) * step)
        r1 = min(c, int(math.floor(hi_src)) + 2)
        off = int(round(r0 * m))
        lo = S // 2 - off                         # the kept block's first index in the slab's output
        if r0 * 2 * S != off * c or lo < 0 or lo + S > int(math.floor((r1 - r0) * m)):
            return None                           # geometry not covered: caller uses the full path
        slab = grid_field[(slice(None), slice(None)) + (slice(r0, r1),) * nd]
        if cfg.field_scale == "reference":
            scaled = (slab * S) / cfg.control_grid
        else:
            scaled = slab * cfg.field_factor()
        mode = "bilinear" if nd == 2 else "trilinear"
        up = F.interpolate(scaled, scale_factor=(m,) * nd, mode=mode, align_corners=False,
                           recompute_scale_factor=False)
        crop = up[(slice(None), slice(None)) + (slice(lo, lo + S),) * nd]
        return frac_to_px(crop, S)

    def to_image(self, grid_field: torch.Tensor, size: Optional[int] = None) -> torch.Tensor:
        """Control-grid field (fraction of the grid) -> pixel field on the S^d image grid.

        Multiply by the configured factor (S/64 upstream), upsample to 2S (align_corners=False),
        keep the central S^d block, convert to pixels.
        """
        cfg = self.config
        S = int(size or cfg.size)
        if self.fast:
            out = self._to_image_crop(grid_field, S)
            if out is not None:
                return out
        mode = "bilinear" if cfg.ndim == 2 else "trilinear"
        if cfg.field_scale == "reference":
            scaled = (grid_field * S) / cfg.control_grid
        else:
            scaled = grid_field * cfg.field_factor()
        up = F.interpolate(scaled, size=(2 * S,) * cfg.ndim, mode=mode, align_corners=False)
        lo, hi = S // 2, S // 2 + S
        crop = up[(slice(None), slice(None)) + (slice(lo, hi),) * cfg.ndim]
        return frac_to_px(crop, S)

    # ----- public ---------------------------------------------------------------------------
    def iter_frames(self, t_prime: int, draws: Sequence[torch.Tensor], device=None):
        """Forward frames of one sample as they are integrated (for display): yields psi_{t':1} at
        image resolution for t' = 1..t_prime, then returns psi_{t_prime:1}.

        The same numbers as ``sample(t_prime, batch=1, draws=draws, return_frames=True)``; the first
        frame is ready after one composition instead of after all of them (3D: ~1 s sooner).
        """
        cfg = self.config
        draws = [d.to(device) if device is not None else d for d in draws]
        if draws[0].shape[0] != 1:
            raise ValueError("iter_frames draws one sample (batch 1)")
        if not self.fast:
            res = self.sample(int(t_prime), batch=1, draws=draws, return_step=False, return_frames=True)
            yield from res.frames
            return res.forward_ddf
        _v, _noise, v0 = self.base_fields(draws)
        counts = [int(schedule_counts(k, cfg.alpha, cfg.beta, cfg.max_compositions)[1])
                  for k in range(1, int(t_prime) + 1)]
        repeats: Dict[int, int] = {}
        for n in counts:
            repeats[n] = repeats.get(n, 0) + 1
        n_final = int(schedule_counts(int(t_prime), cfg.alpha, cfg.beta, cfg.max_compositions)[1])
        final = None
        for n, state in self._iter_integrate_fast(v0, torch.tensor([n_final]), counts):
            if n is None:
                final = state
                break
            img = self.to_image(state)
            for _ in range(repeats[n]):       # several t' may share one composition count
                yield img
        return self.to_image(final)

    def sample(self, t: Union[int, Sequence[int], torch.Tensor], batch: Optional[int] = None,
               generator: Optional[torch.Generator] = None, draws: Optional[Sequence[torch.Tensor]] = None,
               device=None, return_step: bool = True, return_frames: bool = False,
               return_grid: bool = False) -> ForwardSample:
        """Sample psi_{t:1} (and psi_t) for each t.

        t: an int (with ``batch``) or a per-sample sequence.  ``return_frames`` keeps
        psi_{t':1} for t' = 1..max(t) from the same single pass (for display).
        """
        cfg = self.config
        tt = torch.as_tensor(t, dtype=torch.int64).flatten()
        if batch is not None and tt.numel() == 1:
            tt = tt.expand(batch).clone()
        if (tt < 0).any() or (tt > cfg.n_steps).any():
            raise ValueError(f"t must lie in 0..{cfg.n_steps}, got {tt.tolist()}")
        B = tt.numel()
        if draws is None:
            draws = self.draw(B, generator)
        draws = [d.to(device) if device is not None else d for d in draws]
        v, noise, v0 = self.base_fields(draws)
        nt, nt1 = schedule_counts(tt, cfg.alpha, cfg.beta, cfg.max_compositions)
        keep = None
        tmax = int(tt.max())
        if return_frames:
            keep = [int(schedule_counts(k, cfg.alpha, cfg.beta, cfg.max_compositions)[1]) for k in range(1, tmax + 1)]
        D, kept = self.integrate(v0, nt1, keep)
        forward_ddf = self.to_image(D)
        step = None
        d = None
        if return_step:
            d, _ = self.integrate(v, nt)
            step = self.to_image(d)
        frames = None
        if return_frames:
            frames = LazyFrames([kept[k] for k in keep], self.to_image) if self.fast \
                else [self.to_image(kept[k]) for k in keep]
        grid = None
        if return_grid:
            grid = {"v": v, "noise_field": noise, "v0": v0, "D64": D}
            if d is not None:
                grid["d64"] = d
        return ForwardSample(forward_ddf=forward_ddf, step_ddf=step, t=tt, frames=frames, grid=grid)
