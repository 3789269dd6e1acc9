"""Reading the input formats other than NIfTI: NRRD (with its LPS to RAS flip), DICOM series,
TIFF and JPEG, through ``napari_drdm.io.read_image`` and the napari reader.  Every fixture file is
written into the test's temporary folder and is a few hundred bytes."""
from __future__ import annotations

import numpy as np
import pytest

from napari_drdm._reader import napari_get_reader
from napari_drdm.io import read_image

nrrd = pytest.importorskip("nrrd")

VOL = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 37).astype(np.int16) * 7


# ------------------------------------------------------------------------------------ NRRD
def _world(affine, ijk):
    return (affine @ np.r_[np.asarray(ijk, float), 1.0])[:3]


@pytest.mark.parametrize("space,flip", [("left-posterior-superior", (-1, -1, 1)), ("LPS", (-1, -1, 1)),
                                        ("right-anterior-superior", (1, 1, 1))])
def test_nrrd_affine_is_ras(tmp_path, space, flip):
    """NRRD world coordinates in LPS become RAS (x and y negated, as NIfTI expects); RAS stays."""
    dirs = np.array([[0.0, 2.0, 0.0], [1.5, 0.0, 0.0], [0.0, 0.0, 1.0]])   # i along y, j along x
    origin = np.array([10.0, -20.0, 30.0])
    p = tmp_path / "vol.nrrd"
    nrrd.write(str(p), VOL, {"space": space, "space directions": dirs, "space origin": origin})
    v = read_image(p)
    np.testing.assert_array_equal(v.data, VOL)
    assert v.data.dtype == np.int16
    np.testing.assert_allclose(v.spacing, (2.0, 1.5, 1.0))
    f = np.asarray(flip, float)
    for ijk in ((0, 0, 0), (3, 4, 5), (1, 2, 3)):       # the same physical point, in RAS
        file_world = origin + np.asarray(ijk, float) @ dirs
        np.testing.assert_allclose(_world(v.affine, ijk), f * file_world)


def test_nrrd_through_the_napari_reader(tmp_path):
    p = tmp_path / "head.nrrd"
    nrrd.write(str(p), VOL.astype(np.float32), {"space": "left-posterior-superior",
                                               "space directions": np.diag([2.0, 1.5, 1.0]),
                                               "space origin": np.array([10.0, 20.0, 30.0])})
    (data, kw, kind), = napari_get_reader(str(p))(str(p))
    assert kind == "image" and data.shape == (4, 5, 6) and kw["name"] == "head"
    np.testing.assert_allclose(kw["scale"], (2.0, 1.5, 1.0))
    np.testing.assert_allclose(kw["translate"], (-10.0, -20.0, 30.0))      # the RAS origin
    np.testing.assert_allclose(kw["metadata"]["affine"], [[-2, 0, 0, -10], [0, -1.5, 0, -20], [0, 0, 1, 30],
                                                         [0, 0, 0, 1]])


def test_nrrd_without_space_keeps_its_spacings(tmp_path):
    """A plain NRRD (no world space, per-axis ``spacings``): identity orientation, those spacings."""
    p = tmp_path / "plain.nrrd"
    nrrd.write(str(p), VOL[0], {"spacings": [0.5, 0.25]})
    v = read_image(p)
    np.testing.assert_array_equal(v.data, VOL[0])
    np.testing.assert_allclose(v.spacing, (0.5, 0.25))
    np.testing.assert_allclose(v.affine[:2, :2], np.diag([0.5, 0.25]))


# ------------------------------------------------------------------------------------ DICOM
def test_dicom_series_is_stacked_in_position_order_with_rescale(tmp_path, dicom_slice):
    pytest.importorskip("pydicom")
    d = tmp_path / "series"
    d.mkdir()
    zs = [5.0, 0.0, 2.5, 7.5]                          # file names sort in another order than positions
    for n, z in enumerate(zs):
        dicom_slice(d / f"im{n}.dcm", z, VOL[0] + int(z * 10), slope=2.0, intercept=-1000.0)
    v = read_image(d)
    assert v.data.shape == (4, 5, 6)
    for k, z in enumerate(sorted(zs)):
        np.testing.assert_allclose(v.data[k], 2.0 * (VOL[0] + int(z * 10)) - 1000.0)
    np.testing.assert_allclose(v.spacing, (2.5, 0.7, 0.8))
    np.testing.assert_allclose(np.diag(v.affine)[:3], (2.5, 0.7, 0.8))
    # the napari reader opens the folder as one 3D image with that spacing
    (data, kw, kind), = napari_get_reader(str(d))(str(d))
    assert kind == "image" and data.shape == (4, 5, 6)
    np.testing.assert_allclose(kw["scale"], (2.5, 0.7, 0.8))


def test_single_dicom_file_is_a_2d_image(tmp_path, dicom_slice):
    pytest.importorskip("pydicom")
    dicom_slice(tmp_path / "one.dcm", 0.0, VOL[1])
    v = read_image(tmp_path / "one.dcm")
    np.testing.assert_array_equal(v.data, VOL[1])
    np.testing.assert_allclose(v.spacing, (0.7, 0.8))


# ------------------------------------------------------------------------------------ TIFF, JPEG
def _smooth(shape=(24, 20)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (100 + 60 * np.sin(yy / 5.0) + 40 * np.cos(xx / 4.0)).astype(np.uint8)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_grey_levels_are_read_exactly(tmp_path, dtype):
    from PIL import Image
    a = (_smooth().astype(np.float64) * (257 if dtype == np.uint16 else 1)).astype(dtype)
    if dtype == np.float32:
        a = a / 7.0
    p = tmp_path / "g.tif"
    Image.fromarray(a).save(p)
    v = read_image(p)
    assert v.data.dtype == dtype and v.data.shape == a.shape
    np.testing.assert_array_equal(v.data, a)


def test_multipage_tiff_is_read_as_a_volume(tmp_path):
    """A TIFF stack (one page per slice) is a 3D image, not its first page."""
    from PIL import Image
    pages = [Image.fromarray(VOL[k].astype(np.uint8)) for k in range(4)]
    p = tmp_path / "stack.tiff"
    pages[0].save(p, save_all=True, append_images=pages[1:])
    v = read_image(p)
    np.testing.assert_array_equal(v.data, VOL.astype(np.uint8))
    assert v.spacing == (1.0, 1.0, 1.0)


def test_jpeg_grey_and_grey_stored_as_rgb(tmp_path):
    from PIL import Image
    a = _smooth()
    Image.fromarray(a).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(np.repeat(a[..., None], 3, axis=2)).save(tmp_path / "rgb.jpeg", quality=95)
    for name in ("g.jpg", "rgb.jpeg"):
        v = read_image(tmp_path / name)
        assert v.data.shape == a.shape and v.data.dtype == np.uint8, name
        assert np.abs(v.data.astype(int) - a).max() <= 6, name            # lossy, but the same picture


def test_colour_jpeg_is_refused_naming_the_file(tmp_path):
    from PIL import Image
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = np.arange(16)[None] * 10
    Image.fromarray(rgb).save(tmp_path / "colour.jpg")
    with pytest.raises(ValueError, match=r"colour\.jpg.*colour image.*single-channel"):
        read_image(tmp_path / "colour.jpg")
