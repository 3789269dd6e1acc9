"""On-the-fly DRDM augmentation: a transform for PyTorch ``DataLoader`` pipelines that also follows
the MONAI dictionary-transform convention (no MONAI dependency).

>>> from napari_drdm.transforms import DRDMTransform
>>> aug = DRDMTransform("brain2d", image_keys=("image",), label_keys=("label",), t_prime="40:52:2")
>>> out = aug({"image": img, "label": lab})        # dict in, dict out, same field for every key
>>> out = aug(img)                                 # or a single array / tensor

Arrays are channel-first by default, as in MONAI: (C, *spatial); pass ``channel_dim=None`` for
arrays without a channel axis.  Every channel of every image key is warped by the same field
(image interpolation), label keys by nearest neighbour (values preserved).  The network sees the
first channel of the first image key.  ``ddf_key`` stores the field, (d, *spatial) in pixels.
``fold_guard=True`` makes that field fold-free (det(I + grad phi) > 0 everywhere; README "Fold-free
deformations"); it is off by default, like ``DRDM.generate``.  ``schedule``, ``k``,
``compose_padding`` ("border" or "zeros") and ``input_padding`` (pixels of mirrored image around the
network's input, a multiple of 4 below S/2; 0: the authors' behaviour) and ``background_margin``
(pixels kept around the anatomy, beyond which the field is extended smoothly; "off": the authors'
behaviour) and ``anatomy_fit`` (pixels kept around the anatomy when the model's view is fitted to
it; "off": the whole image, the authors' behaviour) and ``keep_size`` (True / "on": the field's
global zoom over the anatomy removed; "inflation": removed only where the anatomy came out enlarged;
False / "off": kept, the authors' behaviour) are the reverse
loop's options; None: the model's.

Randomness: ``set_random_state(seed)`` (MONAI's ``Randomizable`` API) makes a run repeatable; with
no seed, draws come from torch's global generator, which ``DataLoader`` seeds differently in
every worker.  The model is loaded lazily in each worker process (it is not pickled).  With a GPU
model use ``num_workers=0`` (CUDA does not survive fork) or keep the transform on the CPU.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from .errors import InputError
from .export.jobspec import parse_t_prime
from .validate import (
    check_anatomy_fit_option,
    check_background_margin_option,
    check_compose_padding,
    check_input_padding_option,
    check_keep_size_option,
)

__all__ = ["DRDMTransform", "RandDRDMDeformd"]


class DRDMTransform:
    """Deform an image (and labels) with a DRDM deformation (Algorithm 2), applied with probability ``prob``."""

    def __init__(self, weights: Union[str, object, None] = None, image_keys: Sequence[str] = ("image",),
                 label_keys: Sequence[str] = ("label",), t_prime: Union[int, str] = "40:52:2",
                 prob: float = 1.0, schedule: Optional[str] = None, k: Optional[int] = None,
                 spacing: Optional[Sequence[float]] = None, channel_dim: Optional[int] = 0,
                 label_interp: str = "nearest", ddf_key: Optional[str] = None, device: str = "cpu",
                 allow_missing_keys: bool = False, seed: Optional[int] = None, fold_guard: bool = False,
                 compose_padding: Optional[str] = None, input_padding: Optional[int] = None,
                 background_margin: Union[None, int, str] = None, anatomy_fit: Union[None, int, str] = None,
                 keep_size: Union[None, bool, str] = None):
        self.weights = weights
        self.image_keys, self.label_keys = tuple(image_keys), tuple(label_keys)
        self.t_values = sorted(set(parse_t_prime(t_prime, 1000)))
        self.prob, self.schedule, self.k = float(prob), schedule, k
        self.spacing, self.channel_dim = spacing, channel_dim
        self.label_interp, self.ddf_key, self.device = label_interp, ddf_key, device
        self.allow_missing_keys = allow_missing_keys
        self.fold_guard = fold_guard
        self.compose_padding = check_compose_padding(compose_padding, "compose_padding")
        self._model = weights if (weights is not None and not isinstance(weights, str)) else None
        # checked now as far as it can be (the bound S/2 needs the model: a named one is loaded lazily)
        self.input_padding = check_input_padding_option(input_padding, getattr(self._model, "size", None),
                                                        "input_padding")
        self.background_margin = check_background_margin_option(background_margin,
                                                                 getattr(self._model, "size", None),
                                                                 "background_margin")
        self.anatomy_fit = check_anatomy_fit_option(anatomy_fit, getattr(self._model, "size", None), "anatomy_fit")
        self.keep_size = check_keep_size_option(keep_size, "keep_size")
        self._rng: Optional[np.random.Generator] = None
        self._worker = None
        self._seed = seed
        self._params = (True, self.t_values[0], 0)
        if seed is not None:
            self.set_random_state(seed)

    # -------------------------------------------------------------------- MONAI-style randomness
    def set_random_state(self, seed: Optional[int] = None, state: Optional[np.random.Generator] = None):
        self._seed = seed
        self._rng = state if state is not None else (np.random.default_rng(seed) if seed is not None else None)
        self._worker = None
        return self

    def _generator(self) -> Optional[np.random.Generator]:
        if self._rng is None:
            return None
        import torch.utils.data as tud
        info = tud.get_worker_info()
        wid = info.id if info is not None else None
        if wid is not None and self._worker != wid:  # a forked copy: give each worker its own stream
            self._rng = np.random.default_rng([int(self._seed or 0), wid])
            self._worker = wid
        return self._rng

    def randomize(self, data=None):
        """Draw (apply?, T', seed) for the next call."""
        g = self._generator()
        if g is None:
            import torch
            u = torch.rand(()).item()
            tp = self.t_values[int(torch.randint(len(self.t_values), ()).item())]
            seed = int(torch.randint(0, 2 ** 62, ()).item())
        else:
            u, tp, seed = g.random(), self.t_values[int(g.integers(len(self.t_values)))], int(g.integers(0, 2 ** 62))
        self._params = (u < self.prob, tp, seed)
        return self._params

    # -------------------------------------------------------------------- model
    def __getstate__(self):
        d = dict(self.__dict__)
        if isinstance(self.weights, str) or self.weights is None:
            d["_model"] = None              # reload in the worker process
        return d

    def model(self, ndim: int):
        if self._model is None:
            from .export.sample import DEFAULT_WEIGHTS
            from .model import load_model
            self._model = load_model(self.weights or DEFAULT_WEIGHTS.get(ndim), device=self.device, ndim=ndim)
        return self._model

    # -------------------------------------------------------------------- apply
    @staticmethod
    def _to_numpy(x):
        if hasattr(x, "detach"):
            return x.detach().cpu().numpy()
        return np.asarray(x)

    @staticmethod
    def _like(ref, arr):
        if hasattr(ref, "detach"):           # torch tensor (MONAI MetaTensor keeps its metadata)
            import torch
            out = ref.clone()
            out.copy_(torch.as_tensor(np.ascontiguousarray(arr)).to(device=ref.device, dtype=ref.dtype))
            return out
        return arr

    def _channels(self, a: np.ndarray):
        return (np.moveaxis(a, self.channel_dim, 0), True) if self.channel_dim is not None else (a[None], False)

    def _uncheck(self, a: np.ndarray, had_channel: bool):
        return np.moveaxis(a, 0, self.channel_dim) if had_channel else a[0]

    def deform(self, data: dict, t_prime: int, seed: int, labels_optional: bool = False) -> dict:
        """Apply one deformation (given T' and seed) to every image and label key of ``data``."""
        import torch

        from .core.spatial import warp, warp_labels
        keys = [k for k in self.image_keys if k in data]
        if not keys:
            if self.allow_missing_keys:
                return dict(data)
            raise KeyError(f"none of the image keys {self.image_keys} is in the data (keys: {list(data)})")
        first, _ = self._channels(self._to_numpy(data[keys[0]]))
        model = self.model(first.ndim - 1)
        spacing = self.spacing or getattr(data[keys[0]], "pixdim", None)
        spacing = [float(s) for s in spacing][: first.ndim - 1] if spacing is not None else None
        res = model.generate(first[0], None, t_prime=t_prime, seed=seed, schedule=self.schedule, k=self.k,
                             spacing=spacing, label_interp=self.label_interp, fold_guard=self.fold_guard,
                             compose_padding=self.compose_padding, input_padding=self.input_padding,
                             background_margin=self.background_margin, anatomy_fit=self.anatomy_fit,
                             keep_size=self.keep_size)
        ddf = torch.as_tensor(res.ddf, device=model.device)[None]
        out = dict(data)
        for key in keys:
            a, ch = self._channels(self._to_numpy(data[key]))
            x = torch.as_tensor(a.astype(np.float32), device=model.device)[None]
            axes = tuple(range(2, x.dim()))
            lo, hi = x.amin(dim=axes, keepdim=True), x.amax(dim=axes, keepdim=True)
            w = torch.maximum(torch.minimum(warp(x - lo, ddf, model.config.image_interp, "zeros") + lo, hi), lo)
            w = w[0].cpu().numpy()
            if np.issubdtype(a.dtype, np.integer):
                info = np.iinfo(a.dtype)
                w = np.clip(np.rint(w), info.min, info.max)
            out[key] = self._like(data[key], self._uncheck(w.astype(a.dtype, copy=False), ch))
        for key in self.label_keys:
            if key not in data:
                if self.allow_missing_keys or labels_optional:
                    continue
                raise KeyError(f"label key {key!r} is not in the data (keys: {list(data)})")
            a, ch = self._channels(self._to_numpy(data[key]))
            lab = a.astype(np.int64) if a.dtype.kind in "iub" or np.all(a == np.round(a)) else None
            if lab is None:
                raise InputError(f"{key!r} holds non-integer values; a label map (integer classes) is expected")
            t = torch.as_tensor(lab, device=model.device)[:, None]
            w = warp_labels(t, ddf.expand(len(lab), *ddf.shape[1:]), self.label_interp)[:, 0].cpu().numpy()
            out[key] = self._like(data[key], self._uncheck(w.astype(a.dtype), ch))
        if self.ddf_key:
            out[self.ddf_key] = res.ddf
        return out

    def __call__(self, data):
        apply, tp, seed = self.randomize(data)
        if isinstance(data, dict):
            return self.deform(data, tp, seed) if apply else dict(data)
        if not apply:
            return data
        return self.deform({self.image_keys[0]: data}, tp, seed, labels_optional=True)[self.image_keys[0]]


#: MONAI naming convention for a random dictionary transform
RandDRDMDeformd = DRDMTransform
