"""How the explorer's code is laid out: no import cycle between the widget modules, the Qt-free
parts stay Qt-free, and the generation options come from one magicgui form."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

WIDGETS = Path(__file__).resolve().parents[1] / "src" / "napari_drdm" / "_widgets"


def _local_imports(path: Path):
    """Sibling modules imported by ``path`` (``from ._x import ...`` or ``from . import _x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out


def _cycle(graph):
    """One import cycle as a list of module names, or None."""
    state = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n, stack + [n])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_no_import_cycle_between_widget_modules():
    graph = {p.stem: _local_imports(p) for p in WIDGETS.glob("*.py")}
    assert "_form" in graph and "_model_choice" in graph and "_readout" in graph
    assert _cycle(graph) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]     # the check works


@pytest.mark.parametrize("module", ["_controller", "_layers", "_inputs", "_run_request", "_worker"])
def test_qt_free_modules_import_no_qt(module):
    tree = ast.parse((WIDGETS / f"{module}.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
              and n.level == 0}
    assert not names & {"qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt"}


def test_generation_form_is_magicgui_and_feeds_the_run(qtbot):
    import inspect

    from magicgui.widgets import Container

    from napari_drdm._widgets._form import ExplorerForm
    from napari_drdm._widgets._worker import explore

    form = ExplorerForm([{"name": "m", "ndim": 2, "size": 32, "bundled": True}], threads=1)
    qtbot.addWidget(form)
    assert isinstance(form.gen, Container)
    form.tprime_spin.setValue(7)                 # a user typing in the Qt widget under the magicgui one
    form.seed_spin.setValue(123)
    form.schedule_combo.setCurrentText("paper")
    form.guard_check.setChecked(True)
    g = form.generation()
    assert g == {"t_prime": 7, "seed": 123, "schedule": "paper", "compose_padding": None, "input_padding": None,
                 "background_margin": None, "anatomy_fit": None, "keep_size": None, "k": 2, "budget_mib": g["budget_mib"],
                 "fold_guard": True}
    # composition padding: the model's own by default (named once a model is loaded), or border / zeros
    assert [form.padding_combo.itemText(i) for i in range(3)] == ["model default", "border", "zeros"]
    form.padding_combo.setCurrentText("zeros")
    form.set_model_padding("border")
    assert form.padding_combo.itemText(0) == "model default (border)" and form.generation()["compose_padding"] == "zeros"
    form.padding_combo.setCurrentIndex(0)
    assert form.generation()["compose_padding"] is None
    # input padding, next to it: the model's own by default (named once a model is loaded), or pixels
    combo = form.input_padding_combo
    assert [combo.itemText(i) for i in range(combo.count())] == ["model default", "0", "4", "8", "16", "32"]
    assert "mirrored image" in form.gen.input_padding.tooltip and "authors" in form.gen.input_padding.tooltip
    combo.setCurrentText("0")
    assert form.generation()["input_padding"] == 0
    form.set_model_padding("border", 8)
    assert combo.itemText(0) == "model default (8)" and form.generation()["input_padding"] == 0
    form.set_model_padding("zeros", 0)
    assert combo.itemText(0) == "model default (0)" and form.padding_combo.itemText(0) == "model default (zeros)"
    combo.setCurrentText("16")
    assert form.generation()["input_padding"] == 16
    combo.setCurrentIndex(0)
    assert form.generation()["input_padding"] is None
    # background margin, below it: the model's own by default (named once a model is loaded), off, or pixels
    combo = form.background_combo
    assert [combo.itemText(i) for i in range(combo.count())] == ["model default", "off", "0", "2", "4", "8", "16"]
    assert "harmonic" in form.gen.background_margin.tooltip and "authors" in form.gen.background_margin.tooltip
    combo.setCurrentText("off")
    assert form.generation()["background_margin"] == "off"
    form.set_model_padding("border", 8, 4)
    assert combo.itemText(0) == "model default (4)" and form.generation()["background_margin"] == "off"
    form.set_model_padding("border", 8, "off")
    assert combo.itemText(0) == "model default (off)"
    combo.setCurrentText("2")
    assert form.generation()["background_margin"] == 2
    combo.setCurrentIndex(0)
    assert form.generation()["background_margin"] is None
    # anatomy fit, below it: the same kind of menu
    combo = form.anatomy_combo
    assert [combo.itemText(i) for i in range(combo.count())] == ["model default", "off", "0", "4", "8", "16"]
    assert "at most 2x" in form.gen.anatomy_fit.tooltip and "authors" in form.gen.anatomy_fit.tooltip
    form.set_model_padding("border", 8, "off", 16)
    assert combo.itemText(0) == "model default (16)" and form.generation()["anatomy_fit"] is None
    combo.setCurrentText("off")
    assert form.generation()["anatomy_fit"] == "off"
    combo.setCurrentText("4")
    assert form.generation()["anatomy_fit"] == 4
    # keep size, below it: model default (named once a model is loaded), on, off
    combo = form.keep_size_combo
    assert [combo.itemText(i) for i in range(combo.count())] == ["model default", "on", "inflation only", "off"]
    assert "global zoom" in form.gen.keep_size.tooltip and "authors" in form.gen.keep_size.tooltip
    form.set_model_padding("border", 8, "off", 16, True)
    assert combo.itemText(0) == "model default (on)" and form.generation()["keep_size"] is None
    combo.setCurrentText("off")
    assert form.generation()["keep_size"] is False
    combo.setCurrentText("inflation only")
    assert form.generation()["keep_size"] == "inflation"
    form.set_model_padding("border", 8, "off", 16, "inflation")
    assert combo.itemText(0) == "model default (inflation)"
    accepted = set(inspect.signature(explore).parameters)
    assert set(g) - {"budget_mib"} <= accepted       # every option is something the generation takes
    assert form.model_combo.itemData(0) == "m" and form.model_combo.itemText(1) == "Browse..."


def test_folding_percentage_counts_the_pixels_the_folding_layer_shows():
    from napari_drdm._widgets._layers import pack_frame, plan_frames, vector_lattice

    rng = np.random.default_rng(0)
    ddf = (rng.normal(size=(2, 24, 20)) * 0.8).astype(np.float32)     # rough: folds here and there
    plan = plan_frames((24, 20), 1, 1, None, (0.0, 1.0), 1 << 30)
    packed = pack_frame(ddf, np.zeros((24, 20), np.float32), None, None, plan, (1.0, 1.0),
                        vector_lattice((24, 20)))
    fold = packed["folding"]
    assert 0 < fold.sum() < fold.size
    assert packed["metrics"]["folding_pct"] == pytest.approx(100.0 * fold.mean())
    assert np.array_equal(fold, (packed["jacobian"] <= 0).astype(np.uint8))
