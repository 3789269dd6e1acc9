"""The explorer's Jacobian map: where its pixel-scale stripes come from.

The stripes seen in the det(J) layer are not made by the display.  Bilinearly resampling a smooth
model-grid field to the image grid and taking central differences there gives the analytic
det(J) of that field, without stripes (2D and 3D, up- and downsampling).  They come from the
field itself: every composition ``a(x) + b(x + a(x))`` samples ``b`` bilinearly, whose derivative
jumps at each pixel boundary crossed by ``x + a(x)``, so a composed field (the forward sampler's
self-composition, every recovery step) has pixel-scale steps in its Jacobian.
"""
import numpy as np
import pytest
import torch

from napari_drdm._widgets._layers import jacobian_det
from napari_drdm.core.spatial import compose
from napari_drdm.model import ModelGrid


def _alternation(det: np.ndarray, inside: np.ndarray) -> float:
    """Mean |second difference| over all axes: the pixel-to-pixel zigzag of a map."""
    vals = []
    for ax in range(det.ndim):
        dd = np.abs(np.diff(det, 2, axis=ax))
        sl = [slice(None)] * det.ndim
        sl[ax] = slice(1, -1)
        vals.append(float(dd[inside[tuple(sl)]].mean()))
    return max(vals)


def _wave_field(size: int, nd: int, lam: float):
    """u_c = A * prod sin/cos(k x): a smooth field with |grad u| ~ 0.5, and its analytic det(I + grad u)."""
    k = 2 * np.pi / lam
    amp = 0.5 / k

    def field(coords):
        comps = []
        for c in range(nd):
            f = amp * np.ones_like(coords[0])
            for a in range(nd):
                f = f * (np.sin(k * coords[a] + c) if a == c else np.cos(k * coords[a] + 0.5 * c))
            comps.append(f)
        return np.stack(comps)

    def det(coords):
        jac = np.zeros((nd, nd) + coords[0].shape)
        for c in range(nd):
            for a in range(nd):
                g = amp * np.ones_like(coords[0])
                for b in range(nd):
                    ph = k * coords[b] + (c if b == c else 0.5 * c)
                    if b == a:
                        g = g * k * (np.cos(ph) if b == c else -np.sin(ph))
                    else:
                        g = g * (np.sin(ph) if b == c else np.cos(ph))
                jac[c, a] = g + (1.0 if c == a else 0.0)
        return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))

    model = np.meshgrid(*[np.arange(size, dtype=np.float64)] * nd, indexing="ij")
    return field(model).astype(np.float32), det


@pytest.mark.parametrize("shape,size", [((233, 197), 128), ((233, 197), 256), ((45, 54, 45), 32)])
def test_det_of_a_resampled_smooth_field_is_smooth(shape, size):
    nd = len(shape)
    grid = ModelGrid.fit(shape, (1.0,) * nd, size)
    u, det_true = _wave_field(size, nd, lam=8.0)
    ddf = grid.field_to_original(torch.as_tensor(u)[None])[0].numpy()     # what the explorer gets
    shown = jacobian_det(ddf)
    idx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    model_pos = [(i - o) / s for i, o, s in zip(idx, grid.offset, grid.scale)]
    inside = np.all([(m >= 1) & (m <= size - 2) for m in model_pos], axis=0)
    truth = det_true(model_pos)
    assert np.abs(shown - truth)[inside].mean() < 0.1        # central differences over 2 pixels of an 8-pixel wave
    assert _alternation(shown, inside) <= 1.15 * _alternation(truth, inside) + 1e-3

    if size >= min(shape):
        return
    # the bound does catch stripes: a field upsampled by repeating pixels (nearest) has them
    near = torch.nn.functional.interpolate(torch.as_tensor(u)[None], size=shape, mode="nearest")[0].numpy()
    near = near * np.asarray([n / size for n in shape], np.float32).reshape((-1,) + (1,) * nd)
    assert _alternation(jacobian_det(near), inside) > 2 * _alternation(truth, inside)


def test_composition_makes_the_pixel_scale_steps():
    u, _ = _wave_field(96, 2, lam=12.0)
    a = torch.as_tensor(4.0 * u)[None]             # |grad a| ~ 2: strongly compressed and stretched places
    inside = np.ones((96, 96), bool)
    inside[:8], inside[-8:], inside[:, :8], inside[:, -8:] = False, False, False, False
    smooth = _alternation(jacobian_det(a[0].numpy()), inside)
    composed = _alternation(jacobian_det(compose(a, a, "border")[0].numpy()), inside)
    assert composed > 2 * smooth
