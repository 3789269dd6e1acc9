"""NIfTI reader and writer contributed through the npe2 manifest: geometry survives a round trip."""
from __future__ import annotations

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from napari_drdm._reader import looks_like_labels, napari_get_reader  # noqa: E402
from napari_drdm._writer import write_image, write_labels  # noqa: E402

AFFINE = np.array([[1.5, 0, 0, 10.0],
                   [0, 2.0, 0, -20.0],
                   [0, 0, 3.0, 5.0],
                   [0, 0, 0, 1]])


def _save(path, data, affine=AFFINE):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def _meta(layer_kwargs):
    """What napari hands a single-layer writer (the parts our writer reads)."""
    return {k: layer_kwargs.get(k) for k in ("name", "scale", "translate", "metadata")}


def test_reader_only_claims_nifti(tmp_path):
    assert napari_get_reader(str(tmp_path / "x.png")) is None
    assert napari_get_reader(str(tmp_path / "x.nii.gz")) is not None
    assert napari_get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.nii.gz")]) is not None


def test_image_round_trip_keeps_affine(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, (10, 12, 8)).astype(np.float32)
    path = _save(tmp_path / "t1.nii.gz", data)
    (arr, kw, kind), = napari_get_reader(path)(path)
    assert kind == "image"
    assert kw["name"] == "t1"
    np.testing.assert_allclose(kw["scale"], (1.5, 2.0, 3.0))
    np.testing.assert_allclose(kw["translate"], (10.0, -20.0, 5.0))
    np.testing.assert_allclose(kw["metadata"]["affine"], AFFINE)
    assert kw["metadata"]["nifti_header"] is not None
    np.testing.assert_array_equal(arr, data)

    out = str(tmp_path / "copy.nii.gz")
    assert write_image(out, arr, _meta(kw)) == [out]
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)


def test_writer_uses_scale_and_translate_without_metadata(tmp_path):
    data = np.arange(6 * 7, dtype=np.float32).reshape(6, 7)
    out = str(tmp_path / "plain")                        # no suffix: .nii.gz is added
    paths = write_image(out, data, {"scale": (0.5, 0.8), "translate": (3.0, 4.0), "metadata": {}})
    assert paths == [out + ".nii.gz"]
    back = nib.load(paths[0])
    np.testing.assert_allclose(back.affine[:2, :2], np.diag([0.5, 0.8]))
    np.testing.assert_allclose(back.affine[:2, 3], (3.0, 4.0))
    # and reading it back gives the layer geometry we started from
    (arr, kw, kind), = napari_get_reader(paths[0])(paths[0])
    assert arr.shape == (6, 7)
    np.testing.assert_allclose(kw["scale"], (0.5, 0.8))
    np.testing.assert_allclose(kw["translate"], (3.0, 4.0))


def test_labels_detection_and_round_trip(tmp_path):
    seg = np.zeros((8, 9, 10), np.int16)
    seg[2:5, 3:7, 4:8] = 3
    seg[5:7, 1:3, 1:3] = 1
    path = _save(tmp_path / "case_seg.nii.gz", seg)
    (arr, kw, kind), = napari_get_reader(path)(path)
    assert kind == "labels"
    out = str(tmp_path / "seg_out.nii.gz")
    write_labels(out, arr, _meta(kw))
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(back.dataobj), seg)
    assert np.issubdtype(np.asarray(back.dataobj).dtype, np.integer)

    # an integer CT-like image with many values is an image; a named float mask is labels
    ct = np.random.default_rng(1).integers(-1000, 2000, (8, 9, 10)).astype(np.int16)
    assert not looks_like_labels(ct, "chest")
    assert looks_like_labels(seg, "anything")
    assert looks_like_labels(seg.astype(np.float32), "brain_mask")
    assert not looks_like_labels(np.full((4, 4), 0.5, np.float32), "mask")


def test_4d_time_axis_goes_first_and_back(tmp_path):
    data = np.random.default_rng(2).random((6, 5, 4, 3)).astype(np.float32)     # x, y, z, t
    path = _save(tmp_path / "cine.nii", data)
    (arr, kw, kind), = napari_get_reader(path)(path)
    assert arr.shape == (3, 6, 5, 4)
    assert kw["metadata"]["drdm_time_first"]
    out = str(tmp_path / "cine_out.nii.gz")
    write_image(out, arr, _meta(kw))
    back = nib.load(out)
    assert back.shape == (6, 5, 4, 3)
    np.testing.assert_allclose(back.affine, AFFINE)


def test_field_layer_writes_a_vector_field(tmp_path):
    from napari_drdm.outputs import nifti_array_to_ddf
    ddf = np.random.default_rng(3).normal(0, 1, (2, 6, 7)).astype(np.float32)
    meta = {"scale": (0.5, 2.0), "translate": (0.0, 0.0),
            "metadata": {"drdm_ddf": ddf, "spacing": (0.5, 2.0)}}
    out = str(tmp_path / "field.nii.gz")
    write_image(out, np.zeros((6, 7), np.float32), meta)
    back = nib.load(out)
    assert back.shape == (6, 7, 1, 1, 2)
    np.testing.assert_allclose(nifti_array_to_ddf(np.asarray(back.dataobj), (0.5, 2.0)), ddf, rtol=1e-6)


def test_frames_stack_written_with_frames_last(tmp_path):
    frames = np.random.default_rng(4).random((5, 6, 7)).astype(np.float32)
    meta = {"scale": (1.0, 0.5, 2.0), "translate": (0.0, 1.0, 2.0), "metadata": {"drdm_frame_axis": True}}
    out = str(tmp_path / "frames.nii.gz")
    write_image(out, frames, meta)
    back = nib.load(out)
    assert back.shape == (6, 7, 1, 5)
    np.testing.assert_allclose(np.diag(back.affine)[:2], (0.5, 2.0))
    np.testing.assert_allclose(back.affine[:2, 3], (1.0, 2.0))


def test_viewer_open_and_save_through_manifest(make_napari_viewer, tmp_path):
    pytest.importorskip("napari")
    data = np.random.default_rng(5).random((10, 12, 8)).astype(np.float32)
    path = _save(tmp_path / "vol.nii.gz", data)
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin="napari-drdm")
    layer = layers[0]
    np.testing.assert_allclose(layer.scale, (1.5, 2.0, 3.0))
    np.testing.assert_allclose(layer.translate, (10.0, -20.0, 5.0))
    out = str(tmp_path / "saved.nii.gz")
    viewer.layers.save(out, selected=False, plugin="napari-drdm")
    np.testing.assert_allclose(nib.load(out).affine, AFFINE)
