"""One input of a dataset export, read, checked and prepared for its model: :class:`LoadedSample`.

:class:`ModelProvider` gives the model of each input: the one named by ``weights``, or the
bundled default model of the input's dimensionality (:data:`DEFAULT_WEIGHTS` overrides it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import DRDMError, InputError, one_line
from ..memory import check_memory, estimate_export_bytes
from .discovery import Sample, path_sha256

__all__ = ["DEFAULT_WEIGHTS", "ModelProvider", "LoadedSample", "load_sample", "weights_sha"]

# Per-dimension overrides of the registry's default models (weights.default_weights); empty by default.
DEFAULT_WEIGHTS: Dict[int, str] = {}


def _default_name(ndim: int) -> str:
    """The model used for ``ndim``-D inputs when no weights are named (override, else the registry's)."""
    from ..weights import default_weights
    return DEFAULT_WEIGHTS.get(ndim) or default_weights(ndim)


class ModelProvider:
    """One model for ``weights``, or the bundled model of each input dimension (loaded lazily)."""

    def __init__(self, weights=None, device="auto", size=None, model=None):
        self.weights, self.device, self.size = weights, device, size
        self._models: Dict[int, object] = {}
        self._fixed = model

    def get(self, ndim: int):
        from ..model import load_model
        if self._fixed is None and self.weights:
            self._fixed = load_model(self.weights, device=self.device, size=self.size)
        if self._fixed is not None:
            return self._fixed
        if ndim not in self._models:
            name = f"default {ndim}D model"
            try:
                name = _default_name(ndim)
                self._models[ndim] = load_model(name, device=self.device, size=self.size)
            except DRDMError as e:
                raise type(e)(f"no --weights given and the bundled {ndim}D model {name!r} is not available "
                              f"({one_line(e)}); pass --weights NAME_OR_CHECKPOINT (see `drdm weights`)") from None
        return self._models[ndim]


@dataclass
class LoadedSample:
    """One input, read, checked and prepared for its model (what the computation and the writer use)."""

    sample: Sample                         # the input's name and file paths
    vol: Any                               # the image as read (napari_drdm.io.Volume: data, affine, header)
    lab_vol: Any                           # the label map as read, or None
    image: np.ndarray                      # spatial image (trailing singleton axes squeezed), input dtype
    labels: Optional[np.ndarray]           # label map on the image grid, or None
    spacing: Tuple[float, ...]             # pixel size per array axis (mm)
    model: Any                             # the DRDM model for this input
    grid: Any                              # ModelGrid: the image grid <-> the model's S^d grid
    x_model: Any                           # the image on the model grid, (1, 1, S, ...) tensor
    lo: float                              # the image's value range (kept by the written outputs)
    hi: float
    background: int                        # label written where the deformation samples outside the image
    label_values: Optional[np.ndarray]     # the input's label values (outputs may hold no other)
    x: Any                                 # the image as a (1, 1, *spatial) float32 tensor on the model's device
    lab_t: Any                             # the labels as a (1, 1, *spatial) int64 tensor, or None
    source_sha256: Optional[str]           # sha256 of the image file (None when not computed)
    labels_source_sha256: Optional[str]    # sha256 of the label file


def load_sample(sample: Sample, provider: ModelProvider, with_sha: bool = True, memory=None) -> LoadedSample:
    """Read, check and prepare one input for its model; raises :class:`InputError` naming the file.

    ``memory=(budget_bytes, batch, opts)`` also refuses an input whose estimated peak memory
    (:func:`napari_drdm.memory.estimate_export_bytes`) exceeds the budget."""
    import torch

    from ..checks import check_image, check_labels
    from ..io import read_image, squeeze_trailing
    try:
        vol = read_image(sample.image)
    except (ValueError, OSError) as e:
        raise InputError(f"{sample.image}: unreadable: {e}") from None
    img = squeeze_trailing(np.asarray(vol.data))
    if img.ndim not in (2, 3):
        raise InputError(f"{sample.image}: unsupported {img.ndim}D image of shape {vol.data.shape} (2D or 3D expected)")
    model = provider.get(img.ndim)
    if model.ndim != img.ndim:
        raise InputError(f"{sample.image}: {img.ndim}D image but the weights {model.name!r} are a {model.ndim}D model")
    img = check_image(img, model.ndim, sample.image)
    if memory is not None:
        budget, batch, opts = memory
        est = estimate_export_bytes(img.shape, img.dtype.itemsize, model.size, model.config.channels, batch,
                                    labels=bool(sample.labels), inverse=opts.inverse, pairs=opts.mode == "pairs")
        try:
            check_memory(est, budget, sample.image, batch=batch)
        except MemoryError as e:
            if batch > 1 and est["total"] - est["model_grid"] * (batch - 1) / batch <= budget:
                raise    # a smaller --batch fits: a run-level option, so the run stops (before work) saying so
            raise InputError(str(e)) from None      # this input alone is too large: skipped
    lab_vol, lab = None, None
    if sample.labels:
        try:
            lab_vol = read_image(sample.labels)
        except (ValueError, OSError) as e:
            raise InputError(f"{sample.labels}: unreadable label map: {e}") from None
        lab = squeeze_trailing(np.asarray(lab_vol.data))
        if lab.shape != img.shape:
            raise InputError(f"{sample.labels}: label map shape {lab_vol.data.shape} does not match the image "
                             f"{sample.image} shape {vol.data.shape}")
        try:
            check_labels(lab, img.shape)
        except InputError as e:
            raise InputError(f"{sample.labels}: {e}") from None
    spacing = tuple(float(s) for s in vol.spacing[: img.ndim])
    grid, x_model, lo, hi = model.prepare(img, spacing)
    dev = model.device
    lab_t, background, values = None, 0, None
    if lab is not None:
        values = np.unique(lab)
        background = 0 if (values == 0).any() else int(values.min())
        lab_t = torch.as_tensor(lab.astype(np.int64), device=dev)[None, None]
    return LoadedSample(
        sample=sample, vol=vol, lab_vol=lab_vol, image=img, labels=lab, spacing=spacing, model=model, grid=grid,
        x_model=x_model, lo=lo, hi=hi, background=background, label_values=values,
        x=torch.as_tensor(img.astype(np.float32), device=dev)[None, None], lab_t=lab_t,
        source_sha256=path_sha256(sample.image) if with_sha else None,
        labels_source_sha256=path_sha256(sample.labels) if (with_sha and sample.labels) else None)


def weights_sha(weights) -> Optional[str]:
    """sha256 of the weights file a run uses (bundled: from the registry; None: bundled per dimension)."""
    from ..checkpoint import file_sha256
    from ..weights import registry, resolve_weights
    names = [weights]
    if not weights:
        names = []
        for nd in (2, 3):
            try:
                names.append(_default_name(nd))
            except (LookupError, ValueError):
                names.append(None)
    shas = []
    for w in names:
        try:
            if w is None:
                raise LookupError
            path, name = resolve_weights(w)
        except (LookupError, FileNotFoundError, ValueError):
            shas.append(None)
            continue
        entry = registry().get(name) if not Path(str(w)).expanduser().exists() else None
        shas.append(entry.get("sha256") if entry and entry.get("sha256") else file_sha256(path))
    return shas[0] if weights else "|".join(str(x) for x in shas)
