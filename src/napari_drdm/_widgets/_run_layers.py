"""The explorer's output layers: one set of napari layers per run, filled from its frame store.

:class:`RunLayersMixin` is mixed into :class:`~._explorer.ExplorerWidget`; it expects
``self.viewer``, ``self._runs`` (``_Run`` records), ``self.follow_check``, ``self.update_readout``
and ``self._show_progress``.  Everything here runs in the UI thread, a few times per second
(``_flush``), and only reads what the worker has already stored.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from ._explorer import _Run

__all__ = ["RunLayersMixin", "jacobian_colormap"]

_JACOBIAN_CMAP = None


def jacobian_colormap():
    """Blue (det < 1, compression) - white (det = 1) - red (det > 1, expansion) over contrast [0, 2]."""
    global _JACOBIAN_CMAP
    if _JACOBIAN_CMAP is None:
        from napari.utils.colormaps import Colormap
        _JACOBIAN_CMAP = Colormap(
            colors=[[0.02, 0.19, 0.38, 1], [0.26, 0.58, 0.76, 1], [1, 1, 1, 1], [0.84, 0.38, 0.30, 1],
                    [0.40, 0.0, 0.12, 1]],
            controls=[0.0, 0.25, 0.5, 0.75, 1.0], name="drdm jacobian (centred at 1)")
    return _JACOBIAN_CMAP


def _if_alive(method):
    """Skip a callback once the Qt side of the widget is gone (a model load or a run may outlive it)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            self.objectName()
        except RuntimeError:
            return None
        return method(self, *args, **kwargs)
    return wrapper



class RunLayersMixin:
    """Creation and refresh of a run's layers, and the frame axis they share."""

    def _frame_kwargs(self, run: _Run) -> dict:
        md = {"drdm_run": run.id, "drdm_frame_axis": True, "drdm": dict(run.params),
              "spacing": run.inputs.spacing}
        if run.out_affine is not None:
            md["affine"] = run.out_affine
        return {"scale": (1.0,) + run.out_scale, "translate": (0.0,) + run.out_translate, "metadata": md}

    def _create_layer(self, run: _Run, key: str):
        st = run.store
        v = self.viewer
        src = run.inputs.image_layer
        kw = self._frame_kwargs(run)
        n = st.n                                   # read once: the worker keeps adding frames
        data = st.vectors_data(n) if key == "vectors" else st.view(key, n)
        if key == "image":
            cl = tuple(float(c) for c in src.contrast_limits)
            if st.plan.image_dtype == np.uint8:
                lo, hi = st.plan.image_range
                cl = tuple(float(np.clip((c - lo) / (hi - lo + 1e-12) * 255, 0, 255)) for c in cl)
            if cl[1] <= cl[0]:
                cl = (cl[0], cl[0] + 1)
            layer = v.add_image(data, name=f"{run.base} frames", colormap=src.colormap, contrast_limits=cl,
                                gamma=src.gamma, **kw)
        elif key == "labels":
            layer = v.add_labels(data, name=f"{run.base} labels", opacity=0.35, **kw)
            lab_src = run.inputs.labels_layer
            if lab_src is not None and lab_src.__class__.__name__ == "Labels":
                try:
                    layer.colormap = lab_src.colormap
                except Exception:  # noqa: BLE001 - a colormap that does not transfer is cosmetic
                    pass
        elif key == "jacobian":
            layer = v.add_image(data, name=f"{run.base} jacobian", colormap=jacobian_colormap(),
                                contrast_limits=(0.0, 2.0), visible=False, **kw)
        elif key == "folding":
            layer = v.add_labels(data, name=f"{run.base} folding (det<=0)",
                                 colormap={None: "transparent", 0: "transparent", 1: "magenta"}, opacity=0.9, **kw)
        elif key == "grid":
            layer = v.add_image(data, name=f"{run.base} grid", colormap="cyan", blending="additive",
                                contrast_limits=(0.0, 255.0), opacity=0.5, **kw)
        elif key == "vectors":
            kw["metadata"] = dict(kw["metadata"], drdm_vectors="pull-back: from x towards x + u(x), pixels")
            layer = v.add_vectors(data, name=f"{run.base} vectors", edge_color="yellow",
                                  edge_width=max(0.5, 0.3 * min(run.inputs.image.shape[-2:]) / 64),
                                  vector_style="arrow", visible=False, **kw)
        else:  # pragma: no cover
            raise KeyError(key)
        run.layers[key] = layer
        run.layer_n[key] = n
        if key == "image":
            self._label_frame_axis(run)
        layer.events.visible.connect(lambda _e=None, run=run, key=key: self._update_layer(run, key))

    @_if_alive
    def _update_layer(self, run: _Run, key: str, force: bool = False):
        layer = run.layers.get(key)
        st = run.store
        n = st.n                                   # read once: the worker keeps adding frames
        if layer is None or layer not in self.viewer.layers or run.layer_n.get(key) == n:
            return False
        if not layer.visible and not force:
            return False                 # hidden layers catch up when shown or when the run ends
        layer.data = st.vectors_data(n) if key == "vectors" else st.view(key, n)
        run.layer_n[key] = n
        return True

    @_if_alive
    def _flush(self, complete: bool = False):
        """Show new frames. Layers are created one per tick (the frames layer first, so the first frame
        appears at once); ``complete`` creates and updates everything (end of a run)."""
        for run in self._runs:
            st = run.store
            self._show_progress(run)
            if st.n == 0:
                continue
            created = False
            for key in run.kinds:
                if key not in run.layers:
                    self._create_layer(run, key)
                    created = True
                    if not complete:
                        break
            changed = created
            for key in list(run.layers):
                changed |= self._update_layer(run, key, force=complete)
            if complete and "image" in run.layers and run.layers["image"] in self.viewer.layers:
                self.viewer.layers.selection.active = run.layers["image"]
            n = run.layer_n.get("image", st.n)
            if changed and self.follow_check.isChecked() and (run.running or run.shown < n):
                self._set_frame(run, n - 1)
            run.shown = n
        self.update_readout()

    def _add_final_layers(self, run: _Run, res):
        v = self.viewer
        src = run.inputs.image_layer
        lead = len(run.inputs.lead_index)
        shape1 = (1,) * lead
        md = {"drdm_run": run.id, "drdm": dict(run.params, metrics=res.metrics, forward_metrics=res.forward_metrics),
              "spacing": run.inputs.spacing}
        if run.out_affine is not None:
            md["affine"] = run.out_affine
        src_md = src.metadata or {}
        if src_md.get("nifti_header") is not None and not lead:
            md["nifti_header"] = src_md["nifti_header"]
        kw = {"scale": run.out_scale, "translate": run.out_translate}
        img = res.image.reshape(shape1 + res.image.shape)
        run.layers_final = {}
        run.layers_final["image"] = v.add_image(img, name=f"{run.base} recovered image", colormap=src.colormap,
                                                contrast_limits=src.contrast_limits, visible=False,
                                                metadata=dict(md), **kw)
        if res.labels is not None:
            lmd = dict(md)
            lab_src = run.inputs.labels_layer
            lmd.pop("nifti_header", None)
            if lab_src is not None and (lab_src.metadata or {}).get("nifti_header") is not None and not lead:
                lmd["nifti_header"] = lab_src.metadata["nifti_header"]
            labels = res.labels
            if not np.issubdtype(labels.dtype, np.integer):
                labels = labels.astype(np.int32)
            run.layers_final["labels"] = v.add_labels(labels.reshape(shape1 + labels.shape),
                                                      name=f"{run.base} recovered labels", visible=False,
                                                      metadata=lmd, **kw)
        ddf = np.asarray(res.ddf, dtype=np.float32)
        sp = np.asarray(run.inputs.spacing, dtype=np.float32).reshape((-1,) + (1,) * (ddf.ndim - 1))
        mag = np.sqrt(np.sum((ddf * sp) ** 2, axis=0))
        fmd = {k: val for k, val in md.items() if k != "nifti_header"}
        if lead == 1 and ddf.shape[0] == 2 and src.ndim == 3:
            # a slice of a 3D stack: save the field as a one-slice 3D field (no motion across slices)
            ddf_save = np.concatenate([np.zeros((1,) + ddf.shape[1:], np.float32), ddf], 0)[:, None]
            fmd["spacing"] = tuple(float(s) for s in src.scale)
        else:
            ddf_save = ddf
        fmd["drdm_ddf"] = ddf_save
        fmd["drdm_ddf_convention"] = ("pull-back, pixels (d, *spatial); saved as NIfTI (*spatial, 1, d) in mm: "
                                      "component c = displacement along array axis c")
        run.layers_final["field"] = v.add_image(mag.reshape(shape1 + mag.shape),
                                                name=f"{run.base} recovered field |u| (mm)", colormap="magma",
                                                visible=False, metadata=fmd, **kw)

    # ------------------------------------------------------------------ frames on screen
    def _frame_axis(self, run: _Run) -> Optional[int]:
        layer = run.layers.get("image") or run.layers.get("jacobian")
        if layer is None or layer not in self.viewer.layers:
            return None
        return self.viewer.dims.ndim - layer.ndim

    def _label_frame_axis(self, run: _Run):
        """Name the frame slider 'frame' unless the user has named that axis."""
        ax = self._frame_axis(run)
        if ax is None:
            return
        labels = list(self.viewer.dims.axis_labels)
        if ax < len(labels) and str(labels[ax]).lstrip("-").isdigit():
            labels[ax] = "frame"
            self.viewer.dims.axis_labels = labels

    def _current_frame(self, run: _Run) -> Optional[int]:
        ax = self._frame_axis(run)
        if ax is None or run.store.n == 0:
            return None
        j = int(round(float(self.viewer.dims.point[ax])))
        return int(np.clip(j, 0, run.store.n - 1))

    def _set_frame(self, run: _Run, j: int):
        ax = self._frame_axis(run)
        if ax is None:
            return
        j = int(np.clip(j, 0, max(0, run.store.n - 1)))
        self.viewer.dims.set_point(ax, float(j))
