"""Sample data shipped with the plugin (see ``data/NOTICE.md`` for origins and licences).

Each public function returns napari ``LayerData`` tuples ``(data, kwargs, layer_type)``: the image
with ``scale`` = its spacing in mm, then its label map when it has one. Only numpy is imported
here; napari is never needed to read the files (:func:`load_sample` is used by tests and the CLI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path(__file__).parent / "data"
SAMPLES = ("brain2d", "cardiac_cine", "brain3d", "lung3d")

LayerData = tuple[np.ndarray, dict[str, Any], str]

_DISPLAY = {
    "brain2d": {"name": "MNI152 T1 (axial slice)", "labels": "tissue labels"},
    "cardiac_cine": {"name": "cardiac cine MR (16 frames)", "labels": None},
    "brain3d": {"name": "MNI152 T1 (2 mm)", "labels": "tissue labels"},
    "lung3d": {"name": "lung CT (HU)", "labels": "lung + nodule labels",
               "contrast_limits": (-1000.0, 400.0)},
}


def load_sample(name: str) -> dict[str, Any]:
    """A sample as a plain dict: ``image``, ``labels`` (or None), ``spacing`` (tuple of mm per
    axis), ``affine`` (4x4), ``axes`` and ``description`` (str), plus any extra scalar fields."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample '{name}' (known: {', '.join(SAMPLES)})")
    with np.load(DATA_DIR / f"{name}.npz", allow_pickle=False) as npz:
        raw = {key: npz[key] for key in npz.files}
    sample: dict[str, Any] = {
        "image": raw.pop("image"),
        "labels": raw.pop("labels", None),
        "spacing": tuple(float(s) for s in raw.pop("spacing")),
        "affine": raw.pop("affine"),
        "axes": str(raw.pop("axes", "")),
        "description": str(raw.pop("description", "")),
    }
    sample.update({k: v.item() if v.ndim == 0 else v for k, v in raw.items()})
    return sample


def _layers(name: str) -> list[LayerData]:
    """The sample's image layer and, when present, its labels layer."""
    sample = load_sample(name)
    display = _DISPLAY[name]
    meta = {"description": sample["description"], "affine": sample["affine"],
            "spacing": sample["spacing"], "source": f"napari-drdm sample '{name}'"}
    if sample["axes"].startswith("t"):
        meta["drdm_time_first"] = True        # a 2D+t cine is 2D data with a time axis, not a volume
    kwargs: dict[str, Any] = {"name": display["name"], "scale": sample["spacing"],
                              "colormap": "gray", "metadata": meta}
    if "contrast_limits" in display:
        kwargs["contrast_limits"] = display["contrast_limits"]
    layers: list[LayerData] = [(sample["image"], kwargs, "image")]
    if sample["labels"] is not None:
        layers.append((sample["labels"], {"name": display["labels"], "scale": sample["spacing"],
                                          "opacity": 0.4, "metadata": meta}, "labels"))
    return layers


def brain2d() -> list[LayerData]:
    """Axial slice of the MNI152 2009a T1 with grey/white-matter labels."""
    return _layers("brain2d")


def cardiac_cine() -> list[LayerData]:
    """16-frame cardiac cine MR slice (time is the first axis)."""
    return _layers("cardiac_cine")


def brain3d() -> list[LayerData]:
    """MNI152 2009a T1 at 2 mm with grey/white-matter labels."""
    return _layers("brain3d")


def lung3d() -> list[LayerData]:
    """Chest CT (HU) at 128x128 in-plane with lung and nodule labels."""
    return _layers("lung3d")
