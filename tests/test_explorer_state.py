"""The explorer's Qt-free state (issue 16): runs, names, the frame on screen, texts; no Qt, no napari."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from napari_drdm._widgets._controller import ExplorerState, metrics_text
from napari_drdm._widgets._inputs import Inputs, read_inputs, spatial_ndim
from napari_drdm._widgets._layers import FrameStore, clip_to_image, field_summary, outline_mask, plan_frames
from napari_drdm.core.metrics import affine_text, field_affine


def test_state_imports_without_qt_or_napari():
    code = ("import sys; import napari_drdm._widgets._controller, napari_drdm._widgets._inputs, "
            "napari_drdm._widgets._run_request; "
            "bad = [m for m in ('qtpy', 'napari', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def _run(state, model="m2d", seed=3, t_prime=2, lead=(), n_frames=4, time_first=False):
    shape = (8, 6)
    plan = plan_frames(shape, t_prime, n_frames - t_prime, None)
    store = FrameStore(plan, lead_ndim=len(lead))
    layer = SimpleNamespace(metadata={"drdm_time_first": True} if time_first else {})
    inp = Inputs(layer, None, np.zeros(shape, np.float32), None, (1.0, 1.0), tuple(lead), "")
    run = state.new_run(model, inp, {"t_prime": t_prime, "seed": seed, "schedule": "paper", "k": 2}, store,
                        (1.0, 1.0), (0.0, 0.0), None)
    rng = np.random.default_rng(seed)
    for i in range(n_frames):
        ddf = rng.normal(0, 0.3, (2,) + shape).astype(np.float32)
        phase = "forward" if i < t_prime else "recovery"
        idx = i + 1 if phase == "forward" else i - t_prime + 1
        store.add({"metrics": field_summary(ddf, (1.0, 1.0)), "vectors": (np.zeros((1, 2), np.float32),
                                                                          np.zeros((1, 2), np.float32))},
                  {"phase": phase, "index": idx, "total": t_prime if phase == "forward" else n_frames - t_prime,
                   "t": idx, "frame": i, "n_total": n_frames})
    run.running = False
    return run


def test_names_carry_model_seed_and_are_unique():
    st = ExplorerState()
    a = _run(st, model="brain2d", seed=7)
    b = _run(st, model="cmr2d", seed=7)
    assert a.title == "#1 brain2d s7 T'2" and b.title == "#2 cmr2d s7 T'2"
    assert a.layer_name("folding") != b.layer_name("folding")
    assert len(a.layer_name("folding")) < 30              # short: the layer list elides long names
    assert st.current is b
    st.remove(b.id)
    assert st.current is a and [r.id for r in st.runs] == [1]


def test_frame_on_screen_is_zero_based_and_says_when_it_cannot():
    st = ExplorerState()
    run = _run(st, n_frames=4)
    j, why = st.frame_on_screen(run, [3.0, 0.0, 0.0], True)
    assert j == 3 and why == ""
    text = st.readout(run, j, why)
    assert "frame 3 of 0-3" in text and "recovery step 2 of 2" in text and "image grid 8x6" in text
    j, why = st.frame_on_screen(run, [10.0, 0.0, 0.0], True)            # slider beyond this run
    assert j is None and "frames 0-3" in why and "10" in why
    assert st.frame_on_screen(run, [1.0, 0.0, 0.0], False)[0] is None  # hidden: nothing drawn
    assert st.frame_on_screen(run, None, True)[0] is None              # layer removed
    cine = _run(st, lead=(5,), time_first=True)
    j, why = st.frame_on_screen(cine, [1.0, 2.0, 0.0, 0.0], True)     # time slider moved by 2
    assert j is None and "time 5" in why and "not drawn" in why
    assert st.frame_on_screen(cine, [1.0, 0.0, 0.0, 0.0], True)[0] == 1


def test_series_and_done_text_use_the_same_metrics():
    st = ExplorerState()
    run = _run(st, n_frames=5)
    s = run.series()
    assert len(s["max"]) == 5 and s["forward"].tolist() == [True, True, False, False, False]
    last = run.store.metrics[-1]
    run.final_metrics = {k: last[k] for k in ("max_disp_pct", "mean_disp_pct", "folding_pct", "min_jacobian")}
    st.mark(run, "first_layer")
    st.mark(run, "end")
    done = st.done_text(run)
    assert metrics_text(last, (8, 6)) in done                  # one grid: the readout's last frame == the status
    assert "first frame on screen" in done and "image grid" in done


@pytest.mark.parametrize("shape", [(300, 280), (40, 36, 30)])
def test_the_recovered_fields_affine_part_in_the_status(shape):
    """The status after a run names the recovered field's global affine part, fitted on a
    subsample (the same figures as the whole field), and warns when it is mostly one zoom."""
    from napari_drdm.core.metrics import affine_fit
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) - (n - 1) / 2 for n in shape], indexing="ij")
    zoom = 1.25                                   # pull-back u(x) = (1/z - 1) x: the anatomy z times larger
    rng = np.random.default_rng(0)
    ddf = np.stack([(1 / zoom - 1) * g + 0.3 * np.sin(g / 7 + k) for k, g in enumerate(grids)])
    ddf += rng.normal(0, 0.05, ddf.shape)
    a = field_affine(ddf, max_points=4000)
    whole = affine_fit(ddf)
    assert abs(a["affine_zoom"] - zoom) < 0.03 and abs(a["affine_zoom"] - whole["affine_zoom"]) < 0.005
    assert abs(a["affine_share_pct"] - whole["affine_share_pct"]) < 2.0 and a["affine_share_pct"] > 90
    st = ExplorerState()
    run = _run(st, n_frames=3)
    st.mark(run, "end")
    assert "Global affine part" not in st.done_text(run)
    run.final_affine = a
    done = st.done_text(run)
    assert f"Global affine part: zoom {a['affine_zoom']:.3f}" in done and "inflates the whole image" in done
    small = affine_text({"affine_zoom": 1.03, "affine_rotation_deg": 2.0, "affine_share_pct": 80.0})
    assert "zoom 1.030" in small and "inflates" not in small
    shrink = affine_text({"affine_zoom": 0.85, "affine_rotation_deg": 0.0, "affine_share_pct": 70.0})
    assert "shrinks the whole image" in shrink
    local = affine_text({"affine_zoom": 1.2, "affine_rotation_deg": 0.0, "affine_share_pct": 30.0})
    assert "inflates" not in local                # a zoom that explains little of the field


def test_vectors_stay_in_the_image_and_outline_mask():
    pos = np.array([[0, 0], [4, 4], [7, 5]], np.float32)
    vec = np.array([[-3, 2], [1, -1], [4, 4]], np.float32)
    tips = pos + clip_to_image(pos, vec, (8, 6))
    assert np.all(tips >= 0) and np.all(tips <= np.array([7, 5]))
    np.testing.assert_allclose(clip_to_image(pos, vec, (8, 6))[1], [1, -1])       # inside: unchanged
    img = np.zeros((20, 20), np.float32)
    img[5:15, 4:12] = 100
    assert outline_mask(img, None).sum() == 80
    lab = np.zeros((20, 20), np.uint8)
    lab[0, 0] = 3
    assert outline_mask(img, lab).sum() == 1


class _Layer(SimpleNamespace):
    def world_to_data(self, point):
        return np.asarray(point, float)


def test_inputs_model_must_match_the_data_dimensionality():
    vol = _Layer(name="vol", data=np.ones((6, 8, 8), np.float32), metadata={}, scale=(1, 1, 1), ndim=3, rgb=False)
    with pytest.raises(ValueError, match="3D but the model is 2D"):
        read_inputs(vol, None, 2, (0, 0, 0))
    assert read_inputs(vol, None, 2, (2, 0, 0), slice_of_volume=True).lead_index == (2,)
    cine = _Layer(name="cine", data=np.ones((4, 8, 8), np.float32), metadata={"drdm_time_first": True},
                  scale=(1, 1, 1), ndim=3, rgb=False)
    assert spatial_ndim(cine) == 2 and spatial_ndim(vol) == 3
    inp = read_inputs(cine, None, 2, (3, 0, 0))
    assert inp.lead_index == (3,) and "time 3" in inp.describe and "volume" not in inp.describe
    bad = _Layer(name="bad", data=np.full((8, 8), np.nan, np.float32), metadata={}, scale=(1, 1), ndim=2, rgb=False)
    with pytest.raises(ValueError, match="NaN"):          # the engine's own check and message
        read_inputs(bad, None, 2, (0, 0))


def test_export_layer_checks_say_why_in_one_line():
    from napari_drdm._widgets._inputs import check_export_layers
    img = _Layer(name="img", data=np.ones((8, 8), np.float32), rgb=False)
    check_export_layers(img, None)
    check_export_layers(img, _Layer(name="lab", data=np.ones((8, 8), np.uint8)))
    for image, labels, why in ((None, None, "add or pick an image layer"),
                               (_Layer(name="rgb", data=np.ones((8, 8, 3)), rgb=True), None, "RGB"),
                               (_Layer(name="cine", data=np.ones((2, 3, 8, 8))), None, "4D"),
                               (img, _Layer(name="lab", data=np.ones((8, 9), np.uint8)), "differs")):
        with pytest.raises(ValueError, match=why):
            check_export_layers(image, labels)


def test_run_request_says_why_not_or_what_run_starts():
    from napari_drdm._widgets._run_request import NO_IMAGE, prepare_run
    from napari_drdm.core.config import DRDMConfig
    from napari_drdm.errors import InputError

    gen = {"t_prime": 2, "seed": 5, "schedule": "paper", "k": 2, "budget_mib": 64, "fold_guard": True}
    cine = _Layer(name="cine", data=np.ones((4, 8, 8), np.float32), metadata={"drdm_time_first": True},
                  scale=(1, 0.5, 2), translate=(0, 0, 0), ndim=3, rgb=False)
    with pytest.raises(InputError, match="No image layer"):
        prepare_run(None, None, None, "loading", gen, (0, 0, 0))
    assert NO_IMAGE.startswith("No image layer")
    with pytest.raises(InputError, match="^loading$"):
        prepare_run(cine, None, None, "loading", gen, (0, 0, 0))
    model = SimpleNamespace(ndim=2, config=DRDMConfig(schedule="reference", k_recursions=2), device="cpu")
    req = prepare_run(cine, None, model, "", gen, (3, 0, 0))
    assert req.inputs.lead_index == (3,) and req.plan.n_total == 4           # 2 forward + 2 paper reverse steps
    assert req.params == {"t_prime": 2, "seed": 5, "schedule": "paper", "k": 2, "fold_guard": True,
                          "device": "cpu", "variant": "paper K2 guard"}
    req = prepare_run(cine, None, model, "", dict(gen, compose_padding="border"), (3, 0, 0))
    assert req.params["compose_padding"] == "border" and req.params["variant"] == "paper K2 border-padding guard"
    req = prepare_run(cine, None, model, "", dict(gen, compose_padding="zeros"), (3, 0, 0))   # the model's own
    assert req.params["variant"] == "paper K2 guard"
    scale, translate, affine = req.geometry
    assert scale == (1.0, 0.5, 2.0) and translate == (3.0, 0.0, 0.0) and affine is None
    # input padding: passed on, a variant when not the model's own, one line when the model cannot take it
    model = SimpleNamespace(ndim=2, config=DRDMConfig(size=32, schedule="reference", input_padding=8), device="cpu")
    req = prepare_run(cine, None, model, "", dict(gen, input_padding=0), (3, 0, 0))
    assert req.params["input_padding"] == 0 and req.params["variant"] == "paper K2 0px-input-padding guard"
    for own in (None, 8):
        assert prepare_run(cine, None, model, "", dict(gen, input_padding=own), (3, 0, 0)).params["variant"] == \
            "paper K2 guard"
    with pytest.raises(InputError, match=r"^Input padding: expected a multiple of 4 pixels from 0 to below S/2 = 16 "
                                         r"\(the model's side S = 32\), got 16$"):
        prepare_run(cine, None, model, "", dict(gen, input_padding=16), (3, 0, 0))
    # background margin: the same; "off" is the own setting of a model without one
    model = SimpleNamespace(ndim=2, config=DRDMConfig(size=32, schedule="reference", background_margin=4), device="cpu")
    for asked, variant in ((None, "paper K2 guard"), (4, "paper K2 guard"), (2, "paper K2 2px-background-margin guard"),
                           ("off", "paper K2 no-background-extension guard")):
        req = prepare_run(cine, None, model, "", dict(gen, background_margin=asked), (3, 0, 0))
        assert req.params["background_margin"] == asked and req.params["variant"] == variant
    plain = SimpleNamespace(ndim=2, config=DRDMConfig(size=32, schedule="reference"), device="cpu")
    assert prepare_run(cine, None, plain, "", dict(gen, background_margin="off"), (3, 0, 0)).params["variant"] == \
        "paper K2 guard"
    with pytest.raises(InputError, match=r"^Background margin: expected 'off' or a whole number of pixels from 0 to "
                                         r"below S/2 = 16 \(the model's side S = 32\), got 16$"):
        prepare_run(cine, None, model, "", dict(gen, background_margin=16), (3, 0, 0))
    # anatomy fit: the same; "off" is the own setting of a model without one
    model = SimpleNamespace(ndim=2, config=DRDMConfig(size=32, schedule="reference", anatomy_fit=4), device="cpu")
    for asked, variant in ((None, "paper K2 guard"), (4, "paper K2 guard"), (8, "paper K2 8px-anatomy-fit guard"),
                           ("off", "paper K2 whole-image-view guard")):
        req = prepare_run(cine, None, model, "", dict(gen, anatomy_fit=asked), (3, 0, 0))
        assert req.params["anatomy_fit"] == asked and req.params["variant"] == variant
    assert prepare_run(cine, None, plain, "", dict(gen, anatomy_fit="off"), (3, 0, 0)).params["variant"] == \
        "paper K2 guard"
    with pytest.raises(InputError, match=r"^Anatomy fit: expected 'off' or a whole number of pixels from 0 to "
                                         r"below S/2 = 16 \(the model's side S = 32\), got 16$"):
        prepare_run(cine, None, model, "", dict(gen, anatomy_fit=16), (3, 0, 0))
    # keep size: a variant when not the model's own; a bad value is one line naming the menu
    keep = SimpleNamespace(ndim=2, config=DRDMConfig(size=32, schedule="reference", keep_size=True), device="cpu")
    for model_, asked, variant in ((keep, None, "paper K2 guard"), (keep, True, "paper K2 guard"),
                                   (keep, False, "paper K2 zoom-kept guard"), (plain, True, "paper K2 size-kept guard"),
                                   (plain, False, "paper K2 guard"), (plain, "inflation", "paper K2 inflation-removed guard"),
                                   (keep, "inflation", "paper K2 inflation-removed guard")):
        req = prepare_run(cine, None, model_, "", dict(gen, keep_size=asked), (3, 0, 0))
        assert req.params["keep_size"] == asked and req.params["variant"] == variant
    with pytest.raises(InputError, match=r"^Keep anatomy size must be 'on', 'off' or 'inflation', got 'yes'$"):
        prepare_run(cine, None, keep, "", dict(gen, keep_size="yes"), (3, 0, 0))


def test_default_threads_uses_idle_cores(monkeypatch):
    import os

    import napari_drdm
    from napari_drdm._widgets import _worker
    monkeypatch.setattr(napari_drdm, "OPENMP_PASSIVE", False)      # spinning OpenMP threads (issue 15)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert _worker.default_threads() == 2                  # an idle two-core machine: both cores
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert _worker.default_threads() == 1                  # one core busy elsewhere
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert _worker.default_threads() == 7


def test_fold_guard_readout_name_and_done_text():
    """The fold guard's per-frame counts and its summary come from the state, not from Qt."""
    st = ExplorerState()
    run = _run(st, n_frames=4)
    run.params["variant"] = "guard"
    assert run.title == "#1 m2d s3 T'2 guard"
    run.store.metrics[3].update(guard_folded_px=12, guard_changed_px=30)
    assert "fold guard: 12 px folded before (model grid), 30 px corrected, 0 after" in st.readout(run, 3, "")
    assert "fold guard" not in st.readout(run, 0, "")              # forward frames are not corrected
    run.result = SimpleNamespace(guard={"folded_pct_before": [1.5], "changed_pct": [3.25]})
    assert "Fold guard: 1.500 % of model-grid pixels folded before, 3.250 % changed." in st.done_text(run)
    run.result = SimpleNamespace(guard=None)
    assert "Fold guard" not in st.done_text(run)


def test_background_extension_readout_and_done_text():
    """The last recovery frame says it carries the background extension, the frames before do not;
    the done status names the margin and the share replaced."""
    st = ExplorerState()
    run = _run(st, n_frames=4)
    run.store.metrics[3].update(background_margin=8, background_replaced_pct=29.84)
    last = st.readout(run, 3, "")
    assert "Background beyond 8 px of the anatomy extended smoothly (29.8 % of the field replaced" in last
    assert "The frames before show the loop's own field." in last
    assert "Background beyond" not in st.readout(run, 2, "")
    run.result = SimpleNamespace(guard=None, background_margin=8, background_replaced_pct=29.84)
    assert "Background beyond 8 px of the anatomy extended smoothly (29.8 %" in st.done_text(run)
    run.result = SimpleNamespace(guard=None, background_margin=None, background_replaced_pct=0.0)
    assert "Background beyond" not in st.done_text(run)


def test_anatomy_fit_done_text():
    """The done status says how much the fitted view enlarged the image, or that it covered it all."""
    st = ExplorerState()
    run = _run(st, n_frames=4)
    run.result = SimpleNamespace(guard=None, background_margin=None, anatomy_fit=16, view_zoom=1.374)
    assert "Anatomy fit 16 px: the model saw a square around the anatomy, enlarged 1.37x" in st.done_text(run)
    run.result = SimpleNamespace(guard=None, background_margin=None, anatomy_fit=16, view_zoom=1.0)
    assert "the anatomy fills the image, the model saw all of it" in st.done_text(run)
    run.result = SimpleNamespace(guard=None, background_margin=None, anatomy_fit=None, view_zoom=1.0)
    assert "Anatomy fit" not in st.done_text(run)
