"""The DRDM dataset export dock widget under Xvfb (pytest-xvfb), with a tiny random checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("qtpy")

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def tiny2d(tiny_checkpoint):
    return tiny_checkpoint(2, 32)


def _layers(viewer, shape=(40, 36)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disc = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < (min(shape) / 3) ** 2
    viewer.add_image((disc * 100.0 + yy).astype(np.float32), name="brain", scale=(0.8, 1.2))
    viewer.add_labels(disc.astype(np.uint8) * 3, name="tissue", scale=(0.8, 1.2))


def _widget(viewer, tiny, out, n=2):
    from napari_drdm._widgets._export import ExportWidget
    w = ExportWidget(viewer)
    w.weights_edit.setText(tiny)
    w.n_spin.setValue(n)
    w.tprime_edit.setText("1")
    w.schedule.setCurrentText("paper")
    w.out_edit.setText(str(out))
    return w


def test_export_layers_with_preview(make_napari_viewer, qtbot, tiny2d, tmp_path):
    viewer = make_napari_viewer()
    _layers(viewer)
    out = tmp_path / "export"
    w = _widget(viewer, tiny2d, out)
    w.labels_combo.setCurrentText("tissue")
    w.preview_spin.setValue(2)
    w.padding.setCurrentText("border")         # the tiny model's own is zeros
    assert w.run_btn.isEnabled(), w.status.text()
    w.start()
    assert w.running and w.cancel_btn.isEnabled()
    qtbot.waitUntil(lambda: not w.running, timeout=120000)
    assert w.summary["status"] == "complete" and w.summary["complete"], w.summary
    names = [ly.name for ly in viewer.layers]
    assert "brain_aug000" in names and "brain_aug001" in names and "brain_aug000 labels" in names
    lab = viewer.layers["brain_aug000 labels"].data
    assert set(np.unique(lab)) <= {0, 3}
    np.testing.assert_allclose(viewer.layers["brain_aug000"].scale, (0.8, 1.2), rtol=1e-6)
    m = json.loads((out / "manifest.json").read_text())
    assert m["n_rows"] == 2 and (out / "sources" / "brain.nii.gz").exists() and (out / "labels").is_dir()
    assert {r["compose_padding"] for r in m["rows"]} == {"border"}
    assert "complete" in w.status.text()
    assert w.run_btn.isEnabled()            # ready for another run (which would refuse: the folder is not empty)


def test_export_validation_messages(make_napari_viewer, tiny2d, tmp_path):
    from napari_drdm._widgets._export import ExportWidget
    viewer = make_napari_viewer()
    _dw, w = viewer.window.add_plugin_dock_widget("napari-drdm", "DRDM dataset export")   # npe2 manifest
    assert isinstance(w, ExportWidget)
    w.weights_edit.setText(tiny2d)
    w.tprime_edit.setText("1")
    w.out_edit.setText(str(tmp_path / "o"))
    assert not w.run_btn.isEnabled() and "image layer" in w.status.text()
    _layers(viewer)
    assert w.run_btn.isEnabled()
    w.tprime_edit.setText("99")
    assert not w.run_btn.isEnabled() and "T'" in w.status.text()
    w.tprime_edit.setText("1")
    w.source.setCurrentText("Folder")
    assert not w.run_btn.isEnabled() and "input folder" in w.status.text()
    w.folder_edit.setText(str(tmp_path))
    assert w.options().mode == "augment" and w.options().schedule is None       # "model default"
    assert w.options().compose_padding is None
    w.mode.setCurrentIndex(1)
    assert w.tprime_syn_edit.isEnabled() and w.run_btn.isEnabled()
    w.existing.setCurrentText("overwrite")
    opts = w.options()
    assert opts.mode == "pairs" and opts.overwrite and not opts.resume and opts.weights == tiny2d


def test_export_options_are_a_magicgui_form(qtbot):
    from magicgui.widgets import Container

    from napari_drdm._widgets._export_form import OPTION_NAMES, ExportForm
    from napari_drdm.export import ExportOptions
    form = ExportForm(threads=1)
    qtbot.addWidget(form)
    assert isinstance(form.opts, Container)
    form.n_spin.setValue(7)                      # a user typing in the Qt widget under the magicgui one
    form.schedule.setCurrentText("paper")
    form.tprime_edit.setText(" 40:44:2 ")
    form.guard_check.setChecked(False)
    kw = form.option_values()
    assert {k: kw[k] for k in ("per_image", "schedule", "t_prime", "fold_guard", "weights")} == \
        {"per_image": 7, "schedule": "paper", "t_prime": "40:44:2", "fold_guard": False, "weights": None}
    assert set(OPTION_NAMES) <= set(ExportOptions.__dataclass_fields__)       # same names as the engine's
    ExportOptions(**kw).validate()
    assert kw["compose_padding"] is None                                      # "model default"
    form.padding.setCurrentText("zeros")
    assert form.option_values()["compose_padding"] == "zeros"
    assert kw["input_padding"] is None                                        # "model default"
    assert [form.input_padding.itemText(i) for i in range(form.input_padding.count())] == \
        ["model default", "0", "4", "8", "16", "32"]
    form.input_padding.setCurrentText("0")
    assert form.option_values()["input_padding"] == 0 and ExportOptions(**form.option_values()).validate()
    assert kw["background_margin"] is None                                    # "model default"
    assert [form.background_margin.itemText(i) for i in range(form.background_margin.count())] == \
        ["model default", "off", "0", "2", "4", "8", "16"]
    form.background_margin.setCurrentText("off")
    assert form.option_values()["background_margin"] == "off" and ExportOptions(**form.option_values()).validate()
    assert kw["anatomy_fit"] is None                                          # "model default"
    assert [form.anatomy_fit.itemText(i) for i in range(form.anatomy_fit.count())] == \
        ["model default", "off", "0", "4", "8", "16"]
    form.anatomy_fit.setCurrentText("8")
    assert form.option_values()["anatomy_fit"] == 8 and ExportOptions(**form.option_values()).validate()


def test_export_input_padding_is_used_and_recorded(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    """The export dock's input padding reaches the rows; one the model cannot take stops the export
    before any work, saying why in one line."""
    pad8 = tiny_checkpoint(2, 32, name="pad8", input_padding=8)
    viewer = make_napari_viewer()
    _layers(viewer)
    out = tmp_path / "export"
    w = _widget(viewer, pad8, out, n=1)
    w.preview_spin.setValue(0)
    w.input_padding.setCurrentText("16")                  # >= S/2 for S = 32
    assert w.options().input_padding == 16 and w.run_btn.isEnabled()
    w.start()
    qtbot.waitUntil(lambda: not w.running, timeout=120000)
    assert w.summary["status"] == "error"
    assert w.status.text() == ("export stopped: --input-padding: expected a multiple of 4 pixels from 0 to below "
                               "S/2 = 16 (the model's side S = 32), got 16")
    assert not (out / "run.json").exists()
    w.input_padding.setCurrentText("0")
    w.start()
    qtbot.waitUntil(lambda: not w.running, timeout=120000)
    assert w.summary["status"] == "complete", w.summary
    m = json.loads((out / "manifest.json").read_text())
    assert [r["input_padding"] for r in m["rows"]] == [0] and m["run"]["input_padding"] == 0
    assert [r["background_margin"] for r in m["rows"]] == ["off"]        # the model has none


def test_export_background_margin_is_used_and_recorded(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    """The export dock's background margin reaches the rows: the model's own by default, or off."""
    bg4 = tiny_checkpoint(2, 32, name="bg4", background_margin=4)
    viewer = make_napari_viewer()
    _layers(viewer)
    rows = {}
    for choice in (None, "off"):
        out = tmp_path / f"export_{choice}"
        w = _widget(viewer, bg4, out, n=1)
        w.preview_spin.setValue(0)
        if choice is not None:
            w.background_margin.setCurrentText(choice)
        w.start()
        qtbot.waitUntil(lambda w=w: not w.running, timeout=120000)
        assert w.summary["status"] == "complete", w.summary
        rows[choice] = json.loads((out / "manifest.json").read_text())["rows"]
    assert [r["background_margin"] for r in rows[None]] == [4]
    assert [r["background_margin"] for r in rows["off"]] == ["off"]
    assert rows[None][0]["ddf_sha256"] != rows["off"][0]["ddf_sha256"]


def test_export_cancel_and_refusal(make_napari_viewer, qtbot, tiny2d, tmp_path):
    viewer = make_napari_viewer()
    _layers(viewer)
    out = tmp_path / "export"
    w = _widget(viewer, tiny2d, out, n=40)
    w.batch_spin.setValue(1)
    w.preview_spin.setValue(0)
    w.start()
    w.worker.yielded.connect(lambda ev: ev.kind == "row" and w.cancel())      # cancel after the first output
    qtbot.waitUntil(lambda: not w.running, timeout=120000)
    assert w.summary["status"] == "cancelled", w.summary
    m = json.loads((out / "manifest.json").read_text())
    assert 1 <= m["n_rows"] < 40 and not m["complete"]
    w.start()                                # same folder, no resume: refused, with the reason shown
    qtbot.waitUntil(lambda: not w.running, timeout=60000)
    assert w.summary["status"] == "error" and "not empty" in w.status.text()
    w.existing.setCurrentText("resume")
    w.start()
    qtbot.waitUntil(lambda: not w.running, timeout=120000)
    assert w.summary["status"] == "complete" and w.summary["complete"]
