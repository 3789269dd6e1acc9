"""Shipped sample data, and the training kit's logic on a tiny fake kit (no downloads)."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_drdm import _sample_data as sd
from training import kit_convert as kc
from training.kit import KitError, build_kit, check_splits, load_kit, read_manifest
from training.kit_fetch import Archive
from training.kit_sources import CATALOGUE, Catalogue, Entry, Source

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {  # name: (shape, image dtype, label values or None)
    "brain2d": ((233, 197), np.uint8, {0, 1, 2, 3}),
    "cardiac_cine": ((16, 256, 256), np.uint8, None),
    "brain3d": ((94, 116, 98), np.uint8, {0, 1, 2, 3}),
    "lung3d": ((48, 128, 128), np.int16, {0, 1, 2}),
}


# ---------------------------------------------------------------- shipped samples


@pytest.mark.parametrize("name", sd.SAMPLES)
def test_sample_loads_with_expected_arrays(name):
    shape, dtype, values = EXPECTED[name]
    s = sd.load_sample(name)
    assert s["image"].shape == shape and s["image"].dtype == dtype
    assert len(s["spacing"]) == s["image"].ndim and all(v > 0 for v in s["spacing"])
    assert s["affine"].shape == (4, 4)
    assert s["description"] and s["axes"] and len(s["axes"]) == s["image"].ndim
    if values is None:
        assert s["labels"] is None
    else:
        assert s["labels"].shape == shape and np.issubdtype(s["labels"].dtype, np.integer)
        assert set(np.unique(s["labels"]).tolist()) == values


@pytest.mark.parametrize("name", sd.SAMPLES)
def test_sample_layer_data(name):
    layers = getattr(sd, name)()
    data, kwargs, kind = layers[0]
    assert kind == "image" and kwargs["scale"] == sd.load_sample(name)["spacing"]
    assert kwargs["name"]
    if EXPECTED[name][2] is not None:
        labels, lkw, lkind = layers[1]
        assert lkind == "labels" and labels.shape == data.shape and lkw["scale"] == kwargs["scale"]


@pytest.mark.parametrize("name", sd.SAMPLES)
def test_sample_layers_build_in_napari(name):
    layers_mod = pytest.importorskip("napari.layers")
    for data, kwargs, kind in getattr(sd, name)():
        layer = layers_mod.Layer.create(data, kwargs, kind)
        assert tuple(layer.scale) == pytest.approx(kwargs["scale"])


def test_sample_specifics_and_size():
    cine = sd.load_sample("cardiac_cine")
    assert cine["frame_time_ms"] == pytest.approx(69.47, abs=0.01)
    assert cine["spacing"][1:] == pytest.approx((350 / 256, 350 / 256))
    lung = sd.load_sample("lung3d")
    assert lung["image"].min() >= -1024 and lung["image"].max() <= 3071  # HU
    assert (lung["labels"] == 2).sum() > 10
    total = sum((sd.DATA_DIR / f"{n}.npz").stat().st_size for n in sd.SAMPLES)
    assert total < 3e6
    assert (sd.DATA_DIR / "NOTICE.md").exists()
    with pytest.raises(KeyError):
        sd.load_sample("nope")


def test_sample_module_does_not_import_napari():
    code = "import sys, napari_drdm._sample_data; print('napari' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- kit: catalogue and rules


def test_catalogue_holds_out_ct_and_a_brain():
    splits = CATALOGUE.splits
    entries = [e for s in CATALOGUE.sources for e in s.entries]
    assert {e.subject for e in entries} == set(splits)
    assert splits["lung1"] in ("val", "test")
    held_brains = {"brainbrowser_head", "itk_kmeans_head"} & {
        s for s, v in splits.items() if v != "train"}
    assert held_brains
    faces = {e.key for e in entries if e.never_ship}
    assert {"pycortex_s1", "brainbrowser_head", "pydeface_mean", "lung1"} <= faces


def test_label_rules():
    t1 = np.zeros((4, 4, 4), np.uint8)
    t1[1:3, 1:3, 1:3] = 200
    gm, wm = np.zeros_like(t1), np.zeros_like(t1)
    gm[1, 1, 1], wm[2, 2, 2] = 255, 255
    lab = kc.mni_tissue_labels(t1, gm, wm)
    assert lab[1, 1, 1] == 2 and lab[2, 2, 2] == 3 and lab[1, 2, 1] == 1 and lab[0, 0, 0] == 0

    hu = np.full((40, 40, 6), -1000, np.int16)  # outside air touches the border
    hu[4:36, 4:36] = 40  # body
    hu[8:18, 10:30], hu[22:32, 10:30], hu[12:14, 20:22] = -800, -800, 40  # two lungs, a vessel
    hu[19:21, 19:21] = -900  # small airway: third component, dropped
    mask = kc.lung_mask(hu)
    assert mask[8:18, 10:30].all() and mask[22:32, 10:30].all()  # vessel hole filled
    assert not mask[0, 0, 0] and not mask[19, 19, 0]


def test_read_minc_raw_orientation(tmp_path):
    order = ["xspace", "zspace", "yspace"]
    header = {d: {"start": -1.0 * i, "space_length": n, "step": 2.0}
              for i, (d, n) in enumerate(zip(order, (2, 4, 3)))}
    header["order"] = order
    data = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)  # (x, z, y)
    (tmp_path / "h.gz").write_bytes(gzip.compress(json.dumps(header).encode()))
    (tmp_path / "r.gz").write_bytes(gzip.compress(data.tobytes()))
    vol, aff = kc.read_minc_raw(tmp_path / "r.gz", tmp_path / "h.gz")
    assert vol.shape == (2, 3, 4) and vol[1, 2, 3] == data[1, 3, 2]
    assert np.allclose(np.diag(aff)[:3], 2.0) and np.allclose(aff[:3, 3], [0.0, -2.0, -1.0])


# ---------------------------------------------------------------- kit: a tiny fake kit


def _fake_package(tmp_path: Path) -> tuple[Path, str]:
    """A zip with one tiny NIfTI per subject (image) plus one label map."""
    pkg = tmp_path / "fake-1.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(pkg, "w") as zf:
        for name in ("a", "b", "c", "a_seg"):
            arr = (rng.random((6, 5, 4)) * (3 if name.endswith("seg") else 200)).astype(np.uint8)
            img = nib.Nifti1Image(arr, np.diag([2, 2, 3, 1.0]))
            zf.writestr(f"data/{name}.nii", img.to_bytes())
    return pkg, hashlib.sha256(pkg.read_bytes()).hexdigest()


def _entry(subject: str, with_label: bool = False) -> Entry:
    members = (f"data/{subject}.nii",) + ((f"data/{subject}_seg.nii",) if with_label else ())

    def convert(files):
        img, aff = kc.load_nifti(files[members[0]])
        items = [kc.Item(f"{subject}_t1", "image", img, aff, members[:1],
                         label=f"{subject}_seg" if with_label else None)]
        if with_label:
            seg, _ = kc.load_nifti(files[members[1]])
            items.append(kc.Item(f"{subject}_seg", "label", seg, aff, members[1:]))
        return items

    return Entry(f"fake_{subject}", subject, members, convert)


def _fake_catalogue(pkg: Path, sha: str, broken: bool = False) -> Catalogue:
    archive = Archive("file", str(pkg), "1", "fake-1.zip", sha, "test-licence")
    sources = [Source("fake", archive, (_entry("a", True), _entry("b"), _entry("c")))]
    if broken:
        missing = Archive("file", str(pkg.parent / "absent.zip"), "1", "absent.zip", "0" * 64, "x")
        sources.append(Source("broken", missing, (_entry("d"),)))
    return Catalogue(tuple(sources), {"a": "train", "b": "val", "c": "test", "d": "train"})


def test_fake_kit_splits_by_subject(tmp_path):
    pkg, sha = _fake_package(tmp_path)
    out, cache = tmp_path / "kit", tmp_path / "cache"
    failed = build_kit(out, cache, log=lambda s: None, catalogue=_fake_catalogue(pkg, sha, True))
    assert list(failed) == ["broken"] and "absent.zip" in failed["broken"]

    manifest = read_manifest(out)
    assert manifest["splits"] == {"train": ["a"], "val": ["b"], "test": ["c"]}
    for rec in manifest["files"]:
        assert hashlib.sha256((out / rec["path"]).read_bytes()).hexdigest() == rec["sha256"]
        assert rec["source"]["archive_sha256"] == sha and rec["inputs"][0]["sha256"]
        assert rec["licence"] == "test-licence" and rec["never_ship"] is False
    by_split = {s: load_kit(out, s) for s in ("train", "val", "test")}
    subjects = [{r.subject for r in recs} for recs in by_split.values()]
    assert all(not (x & y) for i, x in enumerate(subjects) for y in subjects[i + 1:])
    (train,) = by_split["train"]
    assert train.label is not None and train.label.exists() and train.spacing == (2.0, 2.0, 3.0)
    assert len(load_kit(out, "all")) == 3


def test_fake_kit_rerun_uses_cache(tmp_path):
    pkg, sha = _fake_package(tmp_path)
    out, cache = tmp_path / "kit", tmp_path / "cache"
    cat = _fake_catalogue(pkg, sha)
    build_kit(out, cache, log=lambda s: None, catalogue=cat)
    first = (out / "manifest.json").read_text()
    lines: list[str] = []
    assert build_kit(out, cache, log=lines.append, catalogue=cat) == {}
    assert any("cached" in s for s in lines) and any("up to date" in s for s in lines)
    assert (out / "manifest.json").read_text() == first


def test_fake_kit_rejects_bad_digest_and_mixed_splits(tmp_path):
    pkg, _ = _fake_package(tmp_path)
    failed = build_kit(tmp_path / "kit", tmp_path / "cache", log=lambda s: None,
                       catalogue=_fake_catalogue(pkg, "f" * 64))
    assert "sha256" in failed["fake"]
    with pytest.raises(KitError):
        check_splits([{"subject": "a", "split": "train"}, {"subject": "a", "split": "test"}])
    with pytest.raises(KitError):
        load_kit(tmp_path / "empty", "train")
