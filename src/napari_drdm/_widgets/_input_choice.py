"""Which layers the explorer deforms: the image and labels lists and their automatic choices.

:class:`InputChoice` keeps the form's image and labels lists in step with the viewer's layers
(leaving out the explorer's own outputs), picks a labels layer of the image's shape until the
user picks one (or none), and returns the chosen layers.
"""
from __future__ import annotations

from typing import List, Optional

from ._form import NO_LABELS, ExplorerForm
from ._inputs import is_output_layer

__all__ = ["InputChoice"]


def _label_text(layer) -> str:
    return layer.name if layer.__class__.__name__ == "Labels" else f"{layer.name} (image)"


class InputChoice:
    """The image and labels rows of the form.

    Args:
        viewer: the napari viewer whose layers are offered.
        form: the controls (``image_combo``, ``labels_combo``).
    """

    def __init__(self, viewer, form: ExplorerForm):
        self.viewer = viewer
        self.form = form
        self.labels_touched = False          # the user chose labels (or none): stop choosing for them
        form.labels_combo.activated.connect(self._on_labels_activated)

    def image_layers(self) -> List:
        from napari.layers import Image
        return [ly for ly in self.viewer.layers if isinstance(ly, Image) and not is_output_layer(ly)]

    def labels_candidates(self) -> List:
        """Labels layers first, then single-channel image layers (label maps opened as images)."""
        from napari.layers import Image, Labels
        labs = [ly for ly in self.viewer.layers if isinstance(ly, Labels) and not is_output_layer(ly)]
        imgs = [ly for ly in self.viewer.layers if isinstance(ly, Image) and not is_output_layer(ly)
                and not ly.rgb]
        return labs + imgs

    def refresh(self) -> bool:
        """Refill both lists, keeping the choices that still exist; returns whether the image changed."""
        f = self.form
        cur_img = f.image_combo.currentText()
        cur_lab = f.labels_combo.currentText()
        imgs = [ly.name for ly in self.image_layers()]
        labs = [_label_text(ly) for ly in self.labels_candidates()]
        for combo, names, cur, extra in ((f.image_combo, imgs, cur_img, []),
                                         (f.labels_combo, labs, cur_lab, [NO_LABELS])):
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(extra + names)
            if cur in extra + names:
                combo.setCurrentText(cur)
            combo.blockSignals(False)
        self.auto_labels()
        return f.image_combo.currentText() != cur_img

    def auto_labels(self):
        """Until the user picks labels, choose a labels layer with the image's shape (or none)."""
        if self.labels_touched:
            return
        img = self.image()
        pick = NO_LABELS
        for ly in self.labels_candidates():
            if ly.__class__.__name__ == "Labels" and img is not None and ly.data.shape == img.data.shape:
                pick = ly.name
                break
        combo = self.form.labels_combo
        combo.blockSignals(True)
        combo.setCurrentText(pick)
        combo.blockSignals(False)

    def image(self):
        """The chosen image layer, or None."""
        name = self.form.image_combo.currentText()
        return next((ly for ly in self.image_layers() if ly.name == name), None)

    def labels(self):
        """The chosen labels layer, or None."""
        text = self.form.labels_combo.currentText()
        if not text or text == NO_LABELS:
            return None
        return next((ly for ly in self.labels_candidates() if _label_text(ly) == text), None)

    def set_image(self, name: str):
        """Choose the image layer by name, as the user would."""
        self.form.image_combo.setCurrentText(name)

    def _on_labels_activated(self, _index: int):
        self.labels_touched = True

    def set_labels(self, name: Optional[str]):
        """Choose the labels layer by name (None: no labels), as the user would."""
        self.labels_touched = True
        combo = self.form.labels_combo
        if name is None:
            combo.setCurrentText(NO_LABELS)
            return
        idx = combo.findText(name)
        if idx < 0:
            idx = combo.findText(f"{name} (image)")
        combo.setCurrentIndex(idx)
