"""The explorer's output layers: one set of napari layers per run, filled from its frame store.

:class:`RunLayers` is composed into the explorer (it holds only the viewer); it makes, refreshes,
hides and removes the layers of a :class:`~._controller.Run` and moves the shared frame axis.
It runs in the UI thread, a few times per second, and only reads what the worker has stored.

Look: the frames keep the input's colormap; labels and the warped grid are light
(opacity 0.3, the grid line spacing follows the image size); the Jacobian is translucent with a
colour bar; folds are drawn last, on top, in a colour no other layer uses; the input's outline
(labels > 0, or the image's foreground) is drawn over the frames to judge plausibility.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ._layers import outline_mask

if TYPE_CHECKING:
    from ._controller import Run

__all__ = ["RunLayers", "jacobian_colormap", "FOLD_COLOR", "OUTLINE_COLOR", "OVERLAY_OPACITY"]

FOLD_COLOR = "#39ff14"          # neon green: not in the grey anatomy, the Jacobian's blue-white-red or labels
OUTLINE_COLOR = "#ffb000"       # amber
OVERLAY_OPACITY = 0.3           # labels, frames and recovered alike
GRID_OPACITY = 0.2              # additive white lines: faint on dark background, visible on tissue
JACOBIAN_OPACITY = 0.55
_JACOBIAN_CMAP = None


def jacobian_colormap():
    """Blue (det < 1, compression) - white (det = 1) - red (det > 1, expansion) over contrast [0, 2]."""
    global _JACOBIAN_CMAP
    if _JACOBIAN_CMAP is None:
        from napari.utils.colormaps import Colormap
        _JACOBIAN_CMAP = Colormap(
            colors=[[0.02, 0.19, 0.38, 1], [0.26, 0.58, 0.76, 1], [1, 1, 1, 1], [0.84, 0.38, 0.30, 1],
                    [0.40, 0.0, 0.12, 1]],
            controls=[0.0, 0.25, 0.5, 0.75, 1.0], name="det J (1 = no change)")
    return _JACOBIAN_CMAP


def _colorbar(layer) -> None:
    bar = getattr(layer, "colorbar", None)           # napari >= 0.6
    if bar is not None:
        bar.visible = True


class RunLayers:
    """Creation, refresh, visibility and removal of a run's layers, and the frame axis they share.

    Args:
        viewer: the napari viewer the layers go to.
    """

    def __init__(self, viewer):
        self.viewer = viewer

    # ------------------------------------------------------------------ creation
    def _frame_kwargs(self, run: "Run") -> dict:
        md = {"drdm_run": run.id, "drdm_frame_axis": True, "drdm": dict(run.params, model=run.model),
              "spacing": run.inputs.spacing}
        if run.out_affine is not None:
            md["affine"] = run.out_affine
        return {"scale": (1.0,) + run.out_scale, "translate": (0.0,) + run.out_translate, "metadata": md}

    def create(self, run: "Run", kind: str):
        """Add one layer of the run (``kind`` in :data:`~._controller.KINDS`)."""
        st = run.store
        v = self.viewer
        src = run.inputs.image_layer
        kw = self._frame_kwargs(run)
        name = run.layer_name(kind)
        n = st.n                                   # read once: the worker keeps adding frames
        if kind == "frames":
            cl = tuple(float(c) for c in src.contrast_limits)
            if st.plan.image_dtype == np.uint8:
                lo, hi = st.plan.image_range
                cl = tuple(float(np.clip((c - lo) / (hi - lo + 1e-12) * 255, 0, 255)) for c in cl)
            if cl[1] <= cl[0]:
                cl = (cl[0], cl[0] + 1)
            layer = v.add_image(st.view("image", n), name=name, colormap=src.colormap, contrast_limits=cl,
                                gamma=src.gamma, **kw)
        elif kind == "labels":
            layer = v.add_labels(st.view("labels", n), name=name, opacity=OVERLAY_OPACITY, **kw)
            self._copy_label_colors(run, layer)
        elif kind == "jacobian":
            layer = v.add_image(st.view("jacobian", n), name=name, colormap=jacobian_colormap(),
                                contrast_limits=(0.0, 2.0), opacity=JACOBIAN_OPACITY, blending="translucent",
                                visible=False, **kw)
            _colorbar(layer)
        elif kind == "folding":
            layer = v.add_labels(st.view("folding", n), name=name, opacity=1.0,
                                 colormap={None: "transparent", 0: "transparent", 1: FOLD_COLOR}, **kw)
        elif kind == "grid":
            layer = v.add_image(st.view("grid", n), name=name, colormap="gray", blending="additive",
                                contrast_limits=(0.0, 255.0), opacity=GRID_OPACITY, **kw)
        elif kind == "vectors":
            kw["metadata"] = dict(kw["metadata"], drdm_vectors="pull-back: from x towards x + u(x), pixels")
            side = min(run.inputs.image.shape[-2:])
            layer = v.add_vectors(st.vectors_data(n), name=name, edge_color="yellow", opacity=0.8,
                                  edge_width=max(0.3, side / 200), vector_style="arrow", visible=False, **kw)
        elif kind == "outline":
            inp = run.inputs
            mask = outline_mask(inp.image, inp.labels).reshape((1,) * len(inp.lead_index) + inp.image.shape)
            md = dict(kw["metadata"], drdm_outline="the input before deformation: labels > 0, else foreground")
            md.pop("drdm_frame_axis", None)
            layer = v.add_labels(mask, name=name, scale=run.out_scale, translate=run.out_translate, metadata=md,
                                 colormap={None: "transparent", 0: "transparent", 1: OUTLINE_COLOR},
                                 opacity=0.9)
            layer.contour = max(1, int(round(min(inp.image.shape[-2:]) / 256)))
        else:  # pragma: no cover
            raise KeyError(kind)
        run.layers[kind] = layer
        run.layer_n[kind] = n
        if kind == "frames":
            self._label_frame_axis(run)
        if kind != "outline":
            layer.events.visible.connect(lambda _e=None, run=run, kind=kind: self.update(run, kind))
        return layer

    @staticmethod
    def _copy_label_colors(run: "Run", layer) -> None:
        lab_src = run.inputs.labels_layer
        if lab_src is not None and lab_src.__class__.__name__ == "Labels":
            try:
                layer.colormap = lab_src.colormap
            except Exception:  # noqa: BLE001 - a colormap that does not transfer is cosmetic
                pass

    def update(self, run: "Run", kind: str, force: bool = False) -> bool:
        """Give a layer the frames stored since its last update (hidden layers wait unless forced)."""
        layer = run.layers.get(kind)
        st = run.store
        n = st.n                                   # read once: the worker keeps adding frames
        if layer is None or layer not in self.viewer.layers or kind == "outline" or run.layer_n.get(kind) == n:
            return False
        if not layer.visible and not force:
            return False                 # hidden layers catch up when shown or when the run ends
        layer.data = st.vectors_data(n) if kind == "vectors" else st.view(kind if kind != "frames" else "image", n)
        run.layer_n[kind] = n
        return True

    def flush(self, run: "Run", complete: bool = False) -> bool:
        """Show the run's new frames; returns whether anything changed.

        Layers are created one per call (the frames layer first, so the first frame appears at
        once); ``complete`` creates and updates everything (end of a run).
        """
        if run.store.n == 0:
            return False
        created = False
        for kind in run.kinds:
            if kind not in run.layers:
                self.create(run, kind)
                created = True
                if not complete:
                    break
        changed = created
        for kind in list(run.layers):
            changed |= self.update(run, kind, force=complete)
        return changed

    def add_final(self, run: "Run", res) -> None:
        """The recovered image, labels and field magnitude (hidden; they hold the saveable results)."""
        v = self.viewer
        src = run.inputs.image_layer
        lead = len(run.inputs.lead_index)
        shape1 = (1,) * lead
        md = {"drdm_run": run.id, "drdm": dict(run.params, model=run.model, metrics=res.metrics,
                                               forward_metrics=res.forward_metrics,
                                               compose_padding=res.compose_padding,    # the ones used
                                               input_padding=res.input_padding,
                                               background_margin=res.background_margin,
                                               anatomy_fit=res.anatomy_fit, view_zoom=res.view_zoom,
                                               keep_size=res.keep_size, zoom_removed=res.zoom_removed),
              "spacing": run.inputs.spacing}
        if run.out_affine is not None:
            md["affine"] = run.out_affine
        src_md = src.metadata or {}
        if src_md.get("nifti_header") is not None and not lead:
            md["nifti_header"] = src_md["nifti_header"]
        kw = {"scale": run.out_scale, "translate": run.out_translate}
        img = res.image.reshape(shape1 + res.image.shape)
        run.final["image"] = v.add_image(img, name=run.layer_name("recovered image"), colormap=src.colormap,
                                         contrast_limits=src.contrast_limits, visible=False, metadata=dict(md), **kw)
        if res.labels is not None:
            lmd = dict(md)
            lab_src = run.inputs.labels_layer
            lmd.pop("nifti_header", None)
            if lab_src is not None and (lab_src.metadata or {}).get("nifti_header") is not None and not lead:
                lmd["nifti_header"] = lab_src.metadata["nifti_header"]
            labels = res.labels
            if not np.issubdtype(labels.dtype, np.integer):
                labels = labels.astype(np.int32)
            run.final["labels"] = v.add_labels(labels.reshape(shape1 + labels.shape),
                                               name=run.layer_name("recovered labels"), visible=False,
                                               opacity=OVERLAY_OPACITY, metadata=lmd, **kw)
            self._copy_label_colors(run, run.final["labels"])
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
        top = float(mag.max()) if mag.size and float(mag.max()) > 0 else 1.0
        run.final["field"] = v.add_image(mag.reshape(shape1 + mag.shape), name=run.layer_name("|u| mm"),
                                         colormap="magma", contrast_limits=(0.0, top), visible=False,
                                         metadata=fmd, **kw)
        _colorbar(run.final["field"])
        self.folds_on_top(run)

    def folds_on_top(self, run: "Run") -> None:
        """Keep the folding layer above every other layer of the run."""
        layer = run.layers.get("folding")
        layers = self.viewer.layers
        if layer is not None and layer in layers:
            i = layers.index(layer)
            if i != len(layers) - 1:
                layers.move(i, len(layers))

    # ------------------------------------------------------------------ visibility
    def set_run_visible(self, run: "Run", visible: bool) -> None:
        """Show a run's frame layers as they were made (folds, frames, labels, grid, outline) or hide all."""
        for kind, layer in run.layers.items():
            if layer in self.viewer.layers:
                layer.visible = visible and kind not in ("jacobian", "vectors")
        if not visible:
            for layer in run.final.values():
                if layer in self.viewer.layers:
                    layer.visible = False

    def remove(self, run: "Run") -> None:
        """Delete the run's layers from the viewer."""
        for layer in run.all_layers():
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        run.layers.clear()
        run.final.clear()

    # ------------------------------------------------------------------ frames on screen
    def frames_layer(self, run: "Run"):
        layer = run.layers.get("frames") or run.layers.get("jacobian")
        return layer if layer is not None and layer in self.viewer.layers else None

    def frame_axis(self, run: "Run") -> Optional[int]:
        layer = self.frames_layer(run)
        return None if layer is None else self.viewer.dims.ndim - layer.ndim

    def data_position(self, run: "Run") -> Optional[Sequence[float]]:
        """The viewer's point in the frames layer's data coordinates (frame axis first)."""
        layer = self.frames_layer(run)
        if layer is None:
            return None
        return [float(x) for x in layer.world_to_data(self.viewer.dims.point)]

    def _label_frame_axis(self, run: "Run"):
        """Name the frame slider 'frame' unless the user has named that axis."""
        ax = self.frame_axis(run)
        if ax is None:
            return
        labels = list(self.viewer.dims.axis_labels)
        if ax < len(labels) and str(labels[ax]).lstrip("-").isdigit():
            labels[ax] = "frame"
            self.viewer.dims.axis_labels = labels

    def set_frame(self, run: "Run", j: int):
        """Move the frame slider to frame ``j`` (0-based, clipped to the run's frames) and onto the
        run's time/slice position."""
        layer = self.frames_layer(run)
        if layer is None:
            return
        ax = self.viewer.dims.ndim - layer.ndim
        j = int(np.clip(j, 0, max(0, run.store.n - 1)))
        point = list(self.viewer.dims.point)
        point[ax] = float(j)
        for a in range(len(run.inputs.lead_index)):
            point[ax + 1 + a] = float(layer.data_to_world([0.0] * layer.ndim)[1 + a])
        self.viewer.dims.point = point
