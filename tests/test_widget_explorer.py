"""The DRDM explorer dock widget under Xvfb (pytest-xvfb), with tiny random checkpoints."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("qtpy")

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def tiny2d(tiny_checkpoint):
    return tiny_checkpoint(2, 32)


@pytest.fixture(scope="module")
def tiny3d(tiny_checkpoint):
    return tiny_checkpoint(3, 16)


def _image(shape=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    disc = ((yy - shape[-2] / 2) ** 2 + (xx - shape[-1] / 2) ** 2 < (min(shape[-2:]) / 3) ** 2)
    img = disc * 100.0 + rng.normal(0, 5, shape[-2:])
    img = np.broadcast_to(img, shape).astype(np.float32).copy()
    lab = np.broadcast_to(disc.astype(np.uint8), shape).copy()
    return img, lab


def _open(viewer):
    _dw, widget = viewer.window.add_plugin_dock_widget("napari-drdm", "DRDM explorer")
    return widget


def _with_model(qtbot, widget, ckpt):
    widget.set_checkpoint(ckpt)
    qtbot.waitUntil(widget.model_ready, timeout=30000)


def _run_and_wait(qtbot, widget, t_prime=3, schedule="paper", timeout=60000):
    widget.tprime_spin.setValue(t_prime)
    widget.schedule_combo.setCurrentText(schedule)
    assert widget.run_btn.isEnabled(), widget.reason
    worker = widget.run()
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)
    return worker


def test_import_is_cheap():
    code = ("import sys, napari_drdm, napari_drdm._reader, napari_drdm._writer, napari_drdm._widgets._explorer; "
            "assert 'torch' not in sys.modules, 'torch imported at plugin import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dock_widget_opens_through_manifest(make_napari_viewer):
    from napari_drdm._widgets._explorer import ExplorerWidget
    viewer = make_napari_viewer()
    widget = _open(viewer)
    assert isinstance(widget, ExplorerWidget)
    assert not widget.run_btn.isEnabled()
    assert "image" in widget.reason.lower()


def test_run_2d_makes_layers(make_napari_viewer, qtbot, tiny2d):
    viewer = make_napari_viewer()
    img, lab = _image((48, 40))
    viewer.add_image(img, name="img", scale=(1.0, 1.2))
    viewer.add_labels(lab, name="lab", scale=(1.0, 1.2))
    widget = _open(viewer)
    _with_model(qtbot, widget, tiny2d)
    assert widget.labels_combo.currentText() == "lab"       # matching labels picked by default
    assert widget.padding_combo.currentText() == "model default (zeros)"     # the model's own, named
    widget.seed_spin.setValue(7)
    _run_and_wait(qtbot, widget, t_prime=3, schedule="paper")
    n = 3 + 3                                                # forward t'=1..3, then 3 reverse steps
    run = widget.state.current
    assert run.title == "#1 tiny2d s7 T'3 paper K2"
    names = [ly.name for ly in viewer.layers]
    for kind, shape in [("frames", (n, 48, 40)), ("labels", (n, 48, 40)), ("jacobian", (n, 48, 40)),
                        ("folding", (n, 48, 40)), ("grid", (n, 48, 40)), ("outline", (48, 40)),
                        ("recovered image", (48, 40)), ("recovered labels", (48, 40)), ("|u| mm", (48, 40))]:
        name = run.layer_name(kind)
        assert name in names, (name, names)
        layer = viewer.layers[name]
        assert layer.data.shape == shape, (name, layer.data.shape)
        np.testing.assert_allclose(layer.scale[-2:], (1.0, 1.2))
    vec = viewer.layers[run.layer_name("vectors")]
    assert vec.data.shape[1:] == (2, 3) and set(np.unique(vec.data[:, 0, 0])) == set(range(n))
    # labels keep their classes; the field is saved as a vector field
    assert set(np.unique(viewer.layers[run.layer_name("labels")].data)) <= {0, 1}
    field = viewer.layers[run.layer_name("|u| mm")]
    assert field.metadata["drdm_ddf"].shape == (2, 48, 40)
    jac = viewer.layers[run.layer_name("jacobian")]
    assert tuple(jac.contrast_limits) == (0.0, 2.0)
    # readout follows the slider; the step buttons move it
    frames = viewer.layers[run.layer_name("frames")]
    viewer.layers.selection.active = frames
    axis = viewer.dims.ndim - frames.ndim
    viewer.dims.set_point(axis, 0)
    m0 = widget.readout_metrics()
    assert m0["phase"] == "forward" and m0["t"] == 1
    assert "forward t'=1" in widget.readout.text()
    widget.step(+1)
    assert widget.readout_metrics()["t"] == 2
    viewer.dims.set_point(axis, n - 1)
    m = widget.readout_metrics()
    assert m["phase"] == "recovery" and m["index"] == 3
    assert {"max_disp_pct", "mean_disp_pct", "folding_pct"} <= set(m)
    widget.step(-1)
    assert widget.readout_metrics()["index"] == 2
    assert "done" in widget.status_label.text()
    assert "Global affine part: zoom" in widget.status_label.text()     # the recovered field's
    assert widget.run_btn.isEnabled()
    # the result records the composition padding used; another one is a variant of the run
    assert viewer.layers[run.layer_name("recovered image")].metadata["drdm"]["compose_padding"] == "zeros"
    widget.padding_combo.setCurrentText("border")
    _run_and_wait(qtbot, widget, t_prime=3, schedule="paper")
    run2 = widget.state.current
    assert run2.title == "#2 tiny2d s7 T'3 paper K2 border-padding"
    assert viewer.layers[run2.layer_name("recovered image")].metadata["drdm"]["compose_padding"] == "border"


def test_input_padding_option_reaches_the_run(make_napari_viewer, qtbot, tiny_checkpoint):
    """The form's input padding: "model default (8)" names the model's own; another value is a
    variant of the run, recorded in the results and equal to the Python API's generation; one the
    model cannot take disables Run with one line."""
    from napari_drdm.model import load_model
    pad8 = tiny_checkpoint(2, 32, name="pad8", input_padding=8)
    viewer = make_napari_viewer()
    img, _ = _image((32, 32))
    viewer.add_image(img, name="img")
    widget = _open(viewer)
    _with_model(qtbot, widget, pad8)
    assert widget.input_padding_combo.currentText() == "model default (8)"
    widget.seed_spin.setValue(5)
    assert not widget.guard_check.isChecked()
    widget.input_padding_combo.setCurrentText("16")                 # 16 >= S/2 for S = 32
    assert not widget.run_btn.isEnabled()
    widget.input_padding_combo.setCurrentIndex(0)                   # "model default" (None): Run again
    assert widget.run_btn.isEnabled() and widget.reason == ""
    widget.input_padding_combo.setCurrentText("16")
    assert widget.reason == ("Input padding: expected a multiple of 4 pixels from 0 to below S/2 = 16 "
                             "(the model's side S = 32), got 16")
    widget.input_padding_combo.setCurrentText("0")
    assert widget.run_btn.isEnabled() and widget.reason == ""
    _run_and_wait(qtbot, widget, t_prime=2, schedule="paper")
    run = widget.state.current
    assert run.title == "#1 pad8 s5 T'2 paper K2 0px-input-padding" and run.params["input_padding"] == 0
    md = viewer.layers[run.layer_name("recovered image")].metadata["drdm"]
    assert md["input_padding"] == 0 and md["compose_padding"] == "zeros"
    ddf = viewer.layers[run.layer_name("|u| mm")].metadata["drdm_ddf"]
    res = load_model(pad8, device="cpu").generate(img, t_prime=2, seed=5, schedule="paper", spacing=(1.0, 1.0),
                                                  input_padding=0)
    np.testing.assert_allclose(ddf, res.ddf, rtol=1e-4, atol=1e-4)
    widget.input_padding_combo.setCurrentIndex(0)                     # the model's own: no variant
    _run_and_wait(qtbot, widget, t_prime=2, schedule="paper")
    run2 = widget.state.current
    assert run2.title == "#2 pad8 s5 T'2 paper K2"
    assert viewer.layers[run2.layer_name("recovered image")].metadata["drdm"]["input_padding"] == 8
    assert np.abs(viewer.layers[run2.layer_name("|u| mm")].metadata["drdm_ddf"] - ddf).max() > 1e-3


def test_background_margin_option_reaches_the_run(make_napari_viewer, qtbot, tiny_checkpoint):
    """The form's background margin: "model default (4)" names the model's own and the run's field
    is the Python API's; "off" is a variant of the run, recorded in the results; one the model
    cannot take disables Run with one line."""
    from napari_drdm.model import load_model
    bg4 = tiny_checkpoint(2, 32, name="bg4", background_margin=4)
    viewer = make_napari_viewer()
    img, _ = _image((32, 32))
    img = np.where(img > 50, img, 0.0).astype(np.float32)          # a dark frame: empty background
    viewer.add_image(img, name="img")
    widget = _open(viewer)
    _with_model(qtbot, widget, bg4)
    assert widget.background_combo.currentText() == "model default (4)"
    widget.seed_spin.setValue(5)
    widget.background_combo.setCurrentText("16")                    # 16 >= S/2 for S = 32
    assert not widget.run_btn.isEnabled()
    assert widget.reason == ("Background margin: expected 'off' or a whole number of pixels from 0 to below S/2 = 16 "
                             "(the model's side S = 32), got 16")
    model = load_model(bg4, device="cpu")
    ddfs = {}
    for choice, title, recorded in ((0, "#1 bg4 s5 T'2 paper K2", 4),
                                    ("off", "#2 bg4 s5 T'2 paper K2 no-background-extension", None)):
        if choice == 0:
            widget.background_combo.setCurrentIndex(0)
        else:
            widget.background_combo.setCurrentText(choice)
        assert widget.run_btn.isEnabled() and widget.reason == ""   # back to "model default": Run again
        _run_and_wait(qtbot, widget, t_prime=2, schedule="paper")
        run = widget.state.current
        assert run.title == title
        assert viewer.layers[run.layer_name("recovered image")].metadata["drdm"]["background_margin"] == recorded
        ddfs[recorded] = viewer.layers[run.layer_name("|u| mm")].metadata["drdm_ddf"]
        last = run.store.metrics[run.store.n - 1]                      # the last recovery frame says so
        assert last.get("background_margin") == recorded and ("Background beyond" in widget.status_label.text()) \
            == (recorded is not None)
        res = model.generate(img, t_prime=2, seed=5, schedule="paper", spacing=(1.0, 1.0),
                             background_margin="off" if recorded is None else recorded)
        np.testing.assert_allclose(ddfs[recorded], res.ddf, rtol=1e-4, atol=1e-4)
    assert np.abs(ddfs[4] - ddfs[None]).max() > 1e-4


def test_keep_size_option_reaches_the_run(make_napari_viewer, qtbot, tiny_checkpoint):
    """The form's "Keep anatomy size": "on" is a variant of the run whose field is the Python API's
    with the option, recorded in the layers' metadata and named in the status line."""
    from napari_drdm.model import load_model
    quiet = tiny_checkpoint(2, 32, name="quiet", silent_head=True)      # the field: the forward one
    viewer = make_napari_viewer()
    img, _ = _image((32, 32))
    img = np.where(img > 50, img, 0.0).astype(np.float32)
    viewer.add_image(img, name="img")
    widget = _open(viewer)
    _with_model(qtbot, widget, quiet)
    assert widget.keep_size_combo.currentText() == "model default (off)"
    widget.seed_spin.setValue(5)
    widget.keep_size_combo.setCurrentText("on")
    _run_and_wait(qtbot, widget, t_prime=3, schedule="paper")
    run = widget.state.current
    assert run.title == "#1 quiet s5 T'3 paper K2 size-kept"
    md = viewer.layers[run.layer_name("recovered image")].metadata["drdm"]
    assert md["keep_size"] is True and md["zoom_removed"] != 1.0
    assert "Anatomy size kept: a global zoom of" in widget.status_label.text()
    res = load_model(quiet, device="cpu").generate(img, t_prime=3, seed=5, schedule="paper", spacing=(1.0, 1.0),
                                                   keep_size=True)
    np.testing.assert_allclose(viewer.layers[run.layer_name("|u| mm")].metadata["drdm_ddf"], res.ddf,
                               rtol=1e-4, atol=1e-4)


def test_cancel_keeps_computed_frames(make_napari_viewer, qtbot, tiny2d):
    viewer = make_napari_viewer()
    img, _ = _image((32, 32))
    viewer.add_image(img, name="img")
    widget = _open(viewer)
    _with_model(qtbot, widget, tiny2d)
    widget.tprime_spin.setValue(3)
    widget.schedule_combo.setCurrentText("reference")        # 3 + 80 frames: plenty of time to cancel
    seen = {}

    def cancel_on_first(info):
        if "at_cancel" not in seen:
            seen["at_cancel"] = run.store.n_seen
            widget.cancel()

    worker = widget.run()
    run = widget.state.current
    worker.yielded.connect(cancel_on_first)
    qtbot.waitUntil(lambda: not widget.running, timeout=60000)
    total = run.store.plan.n_total
    assert total == 83
    assert run.cancelled
    assert 1 <= run.store.n < total
    assert run.store.n_seen - seen["at_cancel"] <= 2            # stopped within a step of the request
    frames = viewer.layers[run.layer_name("frames")]
    assert frames.data.shape[0] == run.store.n                 # what was computed stays
    assert not any("recovered" in ly.name for ly in viewer.layers)
    assert "cancelled" in widget.status_label.text()
    assert widget.run_btn.isEnabled() and not widget.cancel_btn.isEnabled()


def test_invalid_inputs_disable_run(make_napari_viewer, qtbot, tiny2d, tiny3d):
    viewer = make_napari_viewer()
    widget = _open(viewer)
    _with_model(qtbot, widget, tiny2d)
    assert not widget.run_btn.isEnabled() and "No image layer" in widget.reason

    img, lab = _image((32, 32))
    viewer.add_image(img, name="ok")
    assert widget.run_btn.isEnabled(), widget.reason

    viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="rgb", rgb=True)
    widget.set_image_layer("rgb")
    assert not widget.run_btn.isEnabled() and "RGB" in widget.reason

    bad = img.copy()
    bad[3, 4] = np.nan
    viewer.add_image(bad, name="nan")
    widget.set_image_layer("nan")
    assert not widget.run_btn.isEnabled() and "NaN" in widget.reason

    widget.set_image_layer("ok")
    viewer.add_labels(np.zeros((30, 32), np.uint8), name="small labels")
    widget.set_labels_layer("small labels")
    assert not widget.run_btn.isEnabled() and "shape" in widget.reason

    viewer.add_image(np.full((32, 32), 0.5, np.float32), name="probabilities")
    widget.set_labels_layer("probabilities")
    assert not widget.run_btn.isEnabled() and "float" in widget.reason

    viewer.add_image((lab * 2).astype(np.float32), name="float classes")   # integer-valued floats are fine
    widget.set_labels_layer("float classes")
    assert widget.run_btn.isEnabled(), widget.reason
    widget.set_labels_layer(None)

    _with_model(qtbot, widget, tiny3d)                    # a 3D model cannot take a 2D image
    widget.set_image_layer("ok")
    assert not widget.run_btn.isEnabled() and "2D but the model is 3D" in widget.reason

    widget.device_combo.setCurrentText("cuda")
    import torch
    if not torch.cuda.is_available():
        qtbot.waitUntil(lambda: not widget._model_loading, timeout=30000)
        assert not widget.run_btn.isEnabled() and "cuda" in widget.reason.lower()


def test_slice_of_a_stack_with_a_2d_model(make_napari_viewer, qtbot, tiny2d):
    viewer = make_napari_viewer()
    img, lab = _image((5, 32, 24))
    viewer.add_image(img, name="stack", scale=(3.0, 1.0, 1.5), translate=(10.0, 0.0, 0.0))
    viewer.add_labels(lab, name="stack labels", scale=(3.0, 1.0, 1.5), translate=(10.0, 0.0, 0.0))
    widget = _open(viewer)
    _with_model(qtbot, widget, tiny2d)
    viewer.dims.set_point(0, 10.0 + 2 * 3.0)                  # slice 2
    assert not widget.run_btn.isEnabled() and "3D but the model is 2D" in widget.reason
    widget.slice_check.setChecked(True)                       # the user asks for the slice on screen
    assert widget.run_btn.isEnabled(), widget.reason
    assert "axis 0 = 2" in widget.input_info.text()
    _run_and_wait(qtbot, widget, t_prime=2, schedule="paper")
    run = widget.state.current
    frames = viewer.layers[run.layer_name("frames")]
    assert run.title.endswith("@2")
    assert frames.data.shape == (4, 1, 32, 24)
    np.testing.assert_allclose(frames.scale, (1.0, 3.0, 1.0, 1.5))
    np.testing.assert_allclose(frames.translate, (0.0, 16.0, 0.0, 0.0))
    rec = viewer.layers[run.layer_name("recovered labels")]
    assert rec.data.shape == (1, 32, 24)
    assert viewer.layers[run.layer_name("|u| mm")].metadata["drdm_ddf"].shape == (3, 1, 32, 24)


def test_3d_run_within_budget(make_napari_viewer, qtbot, tiny3d):
    viewer = make_napari_viewer()
    img, lab = _image((12, 16, 16))
    viewer.add_image(img, name="vol", scale=(2.0, 1.0, 1.0))
    viewer.add_labels(lab, name="vol labels", scale=(2.0, 1.0, 1.0))
    widget = _open(viewer)
    _with_model(qtbot, widget, tiny3d)
    assert widget.run_btn.isEnabled(), widget.reason
    _run_and_wait(qtbot, widget, t_prime=2, schedule="paper")
    run = widget.state.current
    assert viewer.layers[run.layer_name("frames")].data.shape == (4, 12, 16, 16)
    assert viewer.layers[run.layer_name("recovered image")].data.shape == (12, 16, 16)
    assert "frames: all 4 frames" in widget.plan_label.text()


def test_frame_plan_budget():
    from napari_drdm._widgets._layers import plan_frames
    shape = (128, 128, 128)
    full = plan_frames(shape, 45, 80, np.dtype(np.uint8), (0, 1), budget_bytes=64 * 2 ** 30)
    assert not full.compact and full.n_kept == 125
    plan = plan_frames(shape, 45, 80, np.dtype(np.uint8), (0, 1), budget_bytes=2 ** 30)
    assert plan.compact and plan.total_bytes <= 2 ** 30
    assert 44 in plan.keep and 124 in plan.keep and 0 in plan.keep     # last forward and last frame kept
    assert plan.image_dtype == np.float16 and plan.jacobian_dtype == np.float16
    assert "every" in plan.describe() and "budget" in plan.describe()
    ct = plan_frames(shape, 45, 80, None, (-1024, 70000), budget_bytes=2 ** 30)
    assert ct.image_dtype == np.uint8                                   # float16 cannot hold that range
    tiny = plan_frames((400, 400, 400), 45, 80, None, (0, 1), budget_bytes=2 ** 20)
    assert tiny.keep == [124]


def test_manifest_menus_samples_and_export_widget(make_napari_viewer):
    from napari._app_model import get_app_model
    viewer = make_napari_viewer()
    ids = [item.command.id for item in get_app_model().menus.get_menu("napari/layers/transform")
           if hasattr(item, "command")]
    assert "napari-drdm.explorer" in ids and "napari-drdm.export" in ids
    try:
        from napari_drdm._widgets._export import ExportWidget
    except ImportError:
        ExportWidget = None
    if ExportWidget is not None:
        _dw, w = viewer.window.add_plugin_dock_widget("napari-drdm", "DRDM dataset export")
        assert isinstance(w, ExportWidget)
    try:
        import napari_drdm._sample_data  # noqa: F401
    except ImportError:
        pytest.skip("sample data module not there yet")
    for key in ("brain2d", "cardiac_cine", "brain3d", "lung3d"):
        layers = viewer.open_sample("napari-drdm", key)
        assert layers and layers[0].data.ndim in (2, 3)


def test_explorer_on_the_cine_sample_uses_the_current_frame(make_napari_viewer, qtbot, tiny2d):
    try:
        import napari_drdm._sample_data  # noqa: F401
    except ImportError:
        pytest.skip("sample data module not there yet")
    viewer = make_napari_viewer()
    viewer.open_sample("napari-drdm", "cardiac_cine")
    widget = _open(viewer)
    _with_model(qtbot, widget, tiny2d)
    viewer.dims.set_current_step(0, 5)
    assert widget.run_btn.isEnabled(), widget.reason
    assert "time 5" in widget.input_info.text() and "volume" not in widget.input_info.text()
    _run_and_wait(qtbot, widget, t_prime=1, schedule="paper")
    run = widget.state.current
    assert viewer.layers[run.layer_name("frames")].data.shape == (2, 1, 256, 256)
    assert run.title.endswith("@5")


def test_labels_choice_sticks_and_reference_checkpoint_loads(make_napari_viewer, qtbot):
    from pathlib import Path
    viewer = make_napari_viewer()
    img, lab = _image((32, 32))
    viewer.add_image(img, name="img")
    viewer.add_labels(lab, name="lab")
    widget = _open(viewer)
    assert widget.labels_combo.currentText() == "lab"
    widget.set_labels_layer(None)
    viewer.add_labels(lab, name="lab2")                   # new layers do not override the user's choice
    assert widget.labels_combo.currentText() == "(none)"
    from napari_drdm.core import environment
    ref_dir = environment.get("REFERENCE_DIR") or Path(__file__).resolve().parents[2] / "shared" / "reference"
    ref = Path(ref_dir) / "upstream_cmr2d.pth"
    if not ref.exists():
        pytest.skip("reference checkpoint not available")
    widget.set_checkpoint(str(ref), size=64)
    assert widget.size_spin.isEnabled()
    qtbot.waitUntil(widget.model_ready, timeout=30000)
    assert widget.model.size == 64 and widget.model.ndim == 2
    assert "S=64" in widget.model_info.text()
    assert widget.run_btn.isEnabled(), widget.reason


def test_explorer_follows_the_image_dimensionality_until_a_model_is_chosen(make_napari_viewer, qtbot, tiny2d):
    """The default bundled model matches the image: 3D volume -> the 3D default, 2D -> the 2D
    default; once the user picks a model, changing the image no longer changes it."""
    from napari_drdm.weights import default_weights
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((24, 32), np.float32), name="plane")
    widget = _open(viewer)
    assert widget.model_combo.currentData() == default_weights(2)
    viewer.add_image(np.zeros((16, 24, 32), np.float32), name="vol")
    widget.set_image_layer("vol")
    assert widget.model_combo.currentData() == default_weights(3)
    widget.set_image_layer("plane")
    assert widget.model_combo.currentData() == default_weights(2)
    _with_model(qtbot, widget, tiny2d)
    widget.set_image_layer("vol")
    assert widget.model_combo.currentData() == str(tiny2d)


def test_fold_guard_checkbox_shows_folds_before_and_none_after(make_napari_viewer, qtbot, tiny_checkpoint):
    from napari_drdm.core.metrics import folding_pct, strict_folding_pct
    ckpt = tiny_checkpoint(2, 32, seed=1, name="folds2d")  # its recovery folds
    viewer = make_napari_viewer()
    img, _ = _image((40, 44))
    viewer.add_image(img, name="img")
    widget = _open(viewer)
    _with_model(qtbot, widget, ckpt)
    widget.set_labels_layer(None)
    assert not widget.guard_check.isChecked()               # off by default in the explorer
    widget.guard_check.setChecked(True)
    _run_and_wait(qtbot, widget, t_prime=30, schedule="paper", timeout=120000)
    run = widget.state.current
    assert run.title == "#1 folds2d s0 T'30 paper K2 guard"             # the run name says so
    assert run.params["fold_guard"] is True
    fold = viewer.layers[run.layer_name("folding")].data
    store = run.store
    rec = [j for j, m in enumerate(store.metrics) if m["phase"] == "recovery"]
    assert rec and not fold[rec].any()                       # every recovery frame shown fold-free
    assert all(store.metrics[j]["folding_pct"] == 0 for j in rec)
    assert sum(store.metrics[j]["guard_folded_px"] for j in rec) > 0      # ... and it had folds to remove
    ddf = viewer.layers[run.layer_name("|u| mm")].metadata["drdm_ddf"]
    assert folding_pct(ddf) == 0 and strict_folding_pct(ddf) == 0
    frames = viewer.layers[run.layer_name("frames")]
    viewer.layers.selection.active = frames
    viewer.dims.set_point(viewer.dims.ndim - frames.ndim, rec[-1])
    widget.update_readout()
    assert "fold guard:" in widget.readout.text() and "0 after" in widget.readout.text()
    assert "Fold guard:" in widget.status_label.text()


def test_export_widget_fold_guard_default_on(make_napari_viewer):
    from napari_drdm._widgets._export import ExportWidget
    viewer = make_napari_viewer()
    _dw, w = viewer.window.add_plugin_dock_widget("napari-drdm", "DRDM dataset export")
    assert isinstance(w, ExportWidget) and w.guard_check.isChecked()
    assert w.options().fold_guard is True
    w.guard_check.setChecked(False)
    assert w.options().fold_guard is False


def test_anatomy_fit_option_reaches_the_run(make_napari_viewer, qtbot, tiny_checkpoint):
    """The form's anatomy fit: "model default (4)" names the model's own; the run's field is the
    Python API's, its results record the fit and the view's zoom, the status says it; "off" is a
    variant; going back to "model default" after a value the model cannot take enables Run again."""
    from napari_drdm.model import load_model
    fit4 = tiny_checkpoint(2, 32, name="fit4", anatomy_fit=4)
    viewer = make_napari_viewer()
    img = np.zeros((40, 40), np.float32)
    img[14:26, 12:28] = 80.0                                       # a small anatomy in a wide view
    viewer.add_image(img, name="img")
    widget = _open(viewer)
    _with_model(qtbot, widget, fit4)
    assert widget.anatomy_combo.currentText() == "model default (4)"
    widget.seed_spin.setValue(5)
    widget.anatomy_combo.setCurrentText("16")                       # 16 >= S/2 for S = 32
    assert not widget.run_btn.isEnabled() and widget.reason.startswith("Anatomy fit: expected 'off'")
    model = load_model(fit4, device="cpu")
    for choice, title, recorded in ((0, "#1 fit4 s5 T'2 paper K2", 4),
                                    ("off", "#2 fit4 s5 T'2 paper K2 whole-image-view", None)):
        if choice == 0:
            widget.anatomy_combo.setCurrentIndex(0)
        else:
            widget.anatomy_combo.setCurrentText(choice)
        assert widget.run_btn.isEnabled() and widget.reason == ""
        _run_and_wait(qtbot, widget, t_prime=2, schedule="paper")
        run = widget.state.current
        assert run.title == title
        md = viewer.layers[run.layer_name("recovered image")].metadata["drdm"]
        assert md["anatomy_fit"] == recorded and (md["view_zoom"] > 1.5) == (recorded is not None)
        assert ("Anatomy fit 4 px: the model saw a square" in widget.status_label.text()) == (recorded is not None)
        res = model.generate(img, t_prime=2, seed=5, schedule="paper", spacing=(1.0, 1.0),
                             anatomy_fit="off" if recorded is None else recorded)
        np.testing.assert_allclose(viewer.layers[run.layer_name("|u| mm")].metadata["drdm_ddf"], res.ddf,
                                   rtol=1e-4, atol=1e-4)
