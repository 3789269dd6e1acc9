"""Environment variables: one prefix, one module, old names still read with a one-time message."""
from __future__ import annotations

import warnings

import pytest

from napari_drdm.core import environment


@pytest.fixture
def clean(monkeypatch):
    for var in environment.VARIABLES.values():
        monkeypatch.delenv(var.name, raising=False)
        if var.legacy:
            monkeypatch.delenv(var.legacy, raising=False)
    monkeypatch.setattr(environment, "_warned", set())
    return monkeypatch


def test_every_variable_has_the_prefix_and_old_names_are_distinct():
    names = [v.name for v in environment.VARIABLES.values()]
    assert all(n.startswith("NAPARI_DRDM_") for n in names)
    legacy = [v.legacy for v in environment.VARIABLES.values() if v.legacy]
    assert legacy and not set(legacy) & set(names) and all(not n.startswith("NAPARI_") for n in legacy)


def test_old_name_is_read_with_one_message_and_the_new_name_wins(clean):
    clean.setenv("DRDM_WEIGHTS_DIR", "/old")
    with pytest.warns(FutureWarning, match="DRDM_WEIGHTS_DIR is deprecated: set NAPARI_DRDM_WEIGHTS_DIR"):
        assert environment.get("WEIGHTS_DIR") == "/old"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # the message is given once per process
        assert environment.get("WEIGHTS_DIR") == "/old"
        clean.setenv("NAPARI_DRDM_WEIGHTS_DIR", "/new")
        assert environment.get("WEIGHTS_DIR") == "/new"
    clean.setenv("NAPARI_DRDM_WEIGHTS_DIR", "")         # empty counts as unset
    assert environment.get("WEIGHTS_DIR") == "/old"
    with pytest.raises(LookupError, match="not a napari-drdm setting"):
        environment.get("NO_SUCH")


@pytest.mark.parametrize("value,expected", [("1", True), ("ON", True), ("yes", True), ("0", False), (" off ", False),
                                            ("false", False), ("", None), ("maybe", None)])
def test_flag(clean, value, expected):
    clean.setenv("NAPARI_DRDM_NATIVE", value)
    assert environment.flag("NATIVE") is expected


def test_describe_reports_where_a_value_came_from_without_warning(clean):
    clean.setenv("DRDM_CACHE", "/kit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = {r["name"]: r for r in environment.describe()}
    assert rows["NAPARI_DRDM_KIT_CACHE"]["value"] == "/kit" and rows["NAPARI_DRDM_KIT_CACHE"]["set_as"] == "DRDM_CACHE"
    assert rows["NAPARI_DRDM_NATIVE"]["value"] is None


def test_weights_folder_under_both_names(clean, tmp_path, tiny_checkpoint):
    from napari_drdm.weights import list_weights, resolve_weights
    tiny_checkpoint(path=tmp_path / "mine.safetensors")
    clean.setenv("NAPARI_DRDM_WEIGHTS_DIR", str(tmp_path))
    assert resolve_weights("mine") == (tmp_path / "mine.safetensors", "mine")
    clean.delenv("NAPARI_DRDM_WEIGHTS_DIR")
    clean.setenv("DRDM_WEIGHTS_DIR", str(tmp_path))
    with pytest.warns(FutureWarning, match="DRDM_WEIGHTS_DIR"):
        assert any(w["name"] == "mine" and not w["bundled"] for w in list_weights())
