"""Issue 16 ("the explorer and export widget, second pass"): one widget test per numbered point,
under Xvfb (pytest-xvfb) with tiny random checkpoints."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("qtpy")

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint):
    return {"a": tiny_checkpoint(2, 32, name="tinyA"), "b": tiny_checkpoint(2, 32, seed=1, name="tinyB")}


def _image(shape=(40, 36)):
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    disc = ((yy - shape[-2] / 2) ** 2 + (xx - shape[-1] / 2) ** 2 < (min(shape[-2:]) / 3) ** 2)
    img = np.broadcast_to(disc * 100.0 + yy, shape).astype(np.float32).copy()
    return img, np.broadcast_to(disc.astype(np.uint8), shape).copy()


def _explorer(viewer, qtbot, ckpt):
    _dw, w = viewer.window.add_plugin_dock_widget("napari-drdm", "DRDM explorer")
    w.set_checkpoint(ckpt)
    qtbot.waitUntil(w.model_ready, timeout=30000)
    return w


def _run(qtbot, w, t_prime, seed=0):
    w.tprime_spin.setValue(t_prime)
    w.seed_spin.setValue(seed)
    w.schedule_combo.setCurrentText("paper")
    assert w.run_btn.isEnabled(), w.reason
    w.run()
    qtbot.waitUntil(lambda: not w.running, timeout=60000)
    return w.state.current


def test_two_runs_metrics_names_layers_overlays_plot(make_napari_viewer, qtbot, ckpts):
    from napari_drdm._widgets._run_layers import FOLD_COLOR, OVERLAY_OPACITY, jacobian_colormap
    viewer = make_napari_viewer()
    img, lab = _image()
    viewer.add_image(img, name="img")
    viewer.add_labels(lab, name="lab")
    w = _explorer(viewer, qtbot, ckpts["a"])
    viewer.camera.center = (0.0, 500.0, 500.0)            # the view no longer shows the image (a dock widened)
    viewer.camera.zoom = 40.0
    run1 = _run(qtbot, w, 3, seed=4)
    n1 = run1.store.n

    # 1. one metric grid, labelled: the status line and the readout of the last frame agree
    w.set_frame(n1 - 1)
    m = w.readout_metrics()
    assert m is not None
    status, readout = w.status_label.text(), w.readout.text()
    assert "image grid 40x36" in status and "image grid 40x36" in readout
    assert f"folding {m['folding_pct']:.3f} %" in status and f"folding {m['folding_pct']:.3f} %" in readout
    assert f"max {m['max_disp_pct']:.2f} %" in status

    # 3. timing: from Run to the frames layer in the viewer, not the worker's first step
    assert run1.t_first_layer is not None and run1.t_first_step is not None
    assert run1.t_first_layer >= run1.t_first_step
    assert "first frame on screen" in status

    # 4. names carry model and seed, short; the inputs are hidden under the frames
    frames1 = viewer.layers[run1.layer_name("frames")]
    assert run1.layer_name("frames") == "frames #1 tinyA s4 T'3 paper K2"
    assert not viewer.layers["img"].visible and not viewer.layers["lab"].visible

    # 5. folds on top of every layer of the run, in a colour of their own; translucent Jacobian with a bar
    names = [ly.name for ly in viewer.layers]
    fold = viewer.layers[run1.layer_name("folding")]
    assert names.index(fold.name) == len(names) - 1
    jac = viewer.layers[run1.layer_name("jacobian")]
    assert jac.opacity < 1 and str(jac.blending) in ("translucent", "Blending.TRANSLUCENT") and jac.colorbar.visible
    np.testing.assert_allclose(fold.colormap.map(1)[:3], [0x39 / 255, 1.0, 0x14 / 255], atol=1e-3)
    jac_colors = jacobian_colormap().map(np.linspace(0, 1, 64))[:, :3]
    assert np.min(np.abs(jac_colors - fold.colormap.map(1)[:3]).sum(axis=1)) > 0.5
    assert viewer.layers[run1.layer_name("|u| mm")].colorbar.visible
    assert FOLD_COLOR.lower() == "#39ff14"

    # 6. light overlays, vectors inside the image, the view fitted once
    grid = viewer.layers[run1.layer_name("grid")]
    labs = viewer.layers[run1.layer_name("labels")]
    rec = viewer.layers[run1.layer_name("recovered labels")]
    assert grid.opacity <= OVERLAY_OPACITY and labs.opacity == rec.opacity == OVERLAY_OPACITY
    vec = viewer.layers[run1.layer_name("vectors")].data
    tips = vec[:, 0, 1:] + vec[:, 1, 1:]
    assert np.all(tips >= -1e-4) and np.all(tips <= np.array([39, 35]) + 1e-4)
    assert np.allclose(viewer.camera.center[-2:], (19.5, 17.5), atol=1.0)   # fitted to the image again

    # 11. the plot follows the frame on screen; the outline of the input is drawn over the result
    assert w.plot.n == n1 and w.plot.marker == n1 - 1
    w.set_frame(1)
    assert w.plot.marker == 1 and w.readout_metrics() is run1.store.metrics[1]
    w.plot._on_pick(0)                                   # a click on the plot goes to that frame
    assert w.readout_metrics() is run1.store.metrics[0]
    outline = viewer.layers[run1.layer_name("outline")]
    assert outline.contour >= 1 and np.array_equal(outline.data, lab > 0)
    assert names.index(outline.name) > names.index(frames1.name)
    assert w.plot.grab().width() > 0

    # 2 and 4: a second, shorter run with another model; the previous run is hidden
    w.set_checkpoint(ckpts["b"])
    qtbot.waitUntil(w.model_ready, timeout=30000)
    run2 = _run(qtbot, w, 1, seed=4)
    assert run2.title == "#2 tinyB s4 T'1 paper K2" and run2.layer_name("frames") != run1.layer_name("frames")
    assert not frames1.visible and not fold.visible
    assert viewer.layers[run2.layer_name("frames")].visible
    axis = viewer.dims.ndim - frames1.ndim
    viewer.dims.set_point(axis, 4)                       # beyond the 2 frames of run 2
    assert w.readout_metrics() is None
    assert "frames 0-1" in w.readout.text() and "slider is at 4" in w.readout.text()
    viewer.dims.set_point(axis, 0)
    assert "frame 0 of 0-1" in w.readout.text()          # 0-based, as the slider

    # 4. remove run: its layers go, the previous run comes back
    n_layers = len(viewer.layers)
    assert w.remove_btn.isEnabled()
    w.remove_btn.click()
    assert all("#2 tinyB" not in ly.name for ly in viewer.layers)
    assert len(viewer.layers) == n_layers - len(run2.kinds) - 3
    assert w.state.current is run1 and frames1.visible and w.run_combo.count() == 1


def test_readout_on_a_cine_when_time_moves(make_napari_viewer, qtbot, ckpts):
    """2: moving the cine's time slider hides the outputs; the readout says so, not 'frame n'."""
    viewer = make_napari_viewer()
    img, _ = _image((4, 32, 32))
    viewer.add_image(img, name="cine", metadata={"drdm_time_first": True})
    w = _explorer(viewer, qtbot, ckpts["a"])
    viewer.dims.set_current_step(0, 1)
    run = _run(qtbot, w, 1)
    assert run.title.endswith("@1")
    frames = viewer.layers[run.layer_name("frames")]
    t_axis = viewer.dims.ndim - frames.ndim + 1
    assert w.readout_metrics() is not None
    viewer.dims.set_current_step(t_axis, 3)
    assert w.readout_metrics() is None
    assert "made at time 1" in w.readout.text() and "not drawn" in w.readout.text()
    assert w.plot.marker is None


def test_model_follows_the_data_dimensionality(make_napari_viewer, qtbot, ckpts):
    """8: a 2D model on a 3D volume disables Run (unless the slice on screen is asked for);
    a 2D+t cine is 2D data, and the hint does not call time a volume."""
    viewer = make_napari_viewer()
    vol, _ = _image((6, 32, 32))
    viewer.add_image(vol, name="vol")
    w = _explorer(viewer, qtbot, ckpts["a"])
    assert not w.run_btn.isEnabled() and "3D but the model is 2D" in w.reason
    w.slice_check.setChecked(True)
    assert w.run_btn.isEnabled(), w.reason
    viewer.open_sample("napari-drdm", "cardiac_cine")
    w.set_image_layer(viewer.layers[-1].name)
    assert w.run_btn.isEnabled(), w.reason
    assert "2D+t" in w.input_info.text() and "volume" not in w.input_info.text()


def test_opening_nifti_nrrd_dicom_with_this_reader(make_napari_viewer, tmp_path):
    """7: the documented ways to open medical files with this plugin's reader."""
    import nibabel as nib
    import nrrd
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from napari_drdm._reader import prefer_this_reader
    vol = (np.arange(4 * 5 * 6) % 50).reshape(4, 5, 6).astype(np.int16) * 10
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 1.5, 1.0, 1.0])), str(tmp_path / "head.nii.gz"))
    nrrd.write(str(tmp_path / "head.nrrd"), vol.astype(np.float32),
               {"space directions": np.diag([2.0, 1.5, 1.0]), "space": "left-posterior-superior"})
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "slice.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = 5, 6
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 1, "MONOCHROME2"
    ds.PixelSpacing = [1.5, 1.0]
    ds.PixelData = (vol[0] + 1000).astype(np.int16).tobytes()
    ds.save_as(str(tmp_path / "slice.dcm"), enforce_file_format=True)

    viewer = make_napari_viewer()
    for name, shape, scale in (("head.nii.gz", (4, 5, 6), (2.0, 1.5, 1.0)), ("head.nrrd", (4, 5, 6), (2.0, 1.5, 1.0)),
                               ("slice.dcm", (5, 6), (1.5, 1.0))):
        layers = viewer.open(str(tmp_path / name), plugin="napari-drdm")
        assert layers[0].data.shape == shape, name
        np.testing.assert_allclose(layers[0].scale, scale)
    from napari.settings import get_settings
    before = dict(get_settings().plugins.extension2reader)
    try:
        prefer_this_reader()                 # File > Open (and plugin=None) then use this reader, no dialog
        layers = viewer.open(str(tmp_path / "head.nii.gz"), plugin=None)
        assert layers[0].metadata.get("source_path", "").endswith("head.nii.gz")
    finally:
        get_settings().plugins.extension2reader = before


def test_export_widget_inputs_progress_browse_threads_and_height(make_napari_viewer, qtbot, ckpts):
    """9: no explorer outputs as inputs, labels picked, honest progress, Browse... for weights,
    CPU threads like the explorer, and both docks fit a 1000 px high screen."""
    from qtpy.QtWidgets import QPushButton
    viewer = make_napari_viewer()
    img, lab = _image()
    viewer.add_image(img, name="img")
    viewer.add_labels(lab, name="lab")
    ex = _explorer(viewer, qtbot, ckpts["a"])
    _run(qtbot, ex, 1)
    _dw, w = viewer.window.add_plugin_dock_widget("napari-drdm", "DRDM dataset export")
    images = [w.image_combo.itemText(i) for i in range(w.image_combo.count())]
    labels = [w.labels_combo.itemText(i) for i in range(w.labels_combo.count())]
    assert images == ["img"] and labels == ["(none)", "lab"]
    assert w.labels_combo.currentText() == "lab"          # the labels with the image's shape
    w.n_spin.setValue(2)
    assert (w.progress.value(), w.progress.maximum()) == (0, 2)
    browse = [b for b in w.weights_edit.parent().findChildren(QPushButton) if b.text() == "Browse..."]
    assert len(browse) == 1
    assert w.threads_spin.value() == ex.threads_spin.value()
    assert ex.minimumSizeHint().height() + w.minimumSizeHint().height() < 600


def test_closing_napari_right_after_docking_does_not_abort(tmp_path):
    """10: the model loader is still running when the viewer closes; Python must exit cleanly."""
    script = tmp_path / "close.py"
    script.write_text(textwrap.dedent("""
        import napari
        from qtpy.QtWidgets import QApplication
        v = napari.Viewer(show=True)
        v.open_sample("napari-drdm", "brain2d")
        v.window.add_plugin_dock_widget("napari-drdm", "DRDM explorer")
        v.window.add_plugin_dock_widget("napari-drdm", "DRDM dataset export")
        QApplication.processEvents()
        v.close()
        print("closed")
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "has been deleted" not in proc.stderr
