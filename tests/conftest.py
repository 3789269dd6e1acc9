"""Shared fixtures.  Reference data (../shared/reference) is located through NAPARI_DRDM_REFERENCE_DIR
or the default path beside the checkout; tests that need it skip cleanly when it is absent."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_drdm.core import environment

ROOT = Path(__file__).resolve().parents[1]
REF = Path(environment.get("REFERENCE_DIR") or ROOT.parent / "shared" / "reference")

torch.set_num_threads(1)

# pytest imports this checkout (`pythonpath` in pyproject.toml); the commands tests start as
# subprocesses (`python -m napari_drdm.cli`, `python -m training`) import it too
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)]
                                           + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

# the native kernels (core/native_build.py) and the path autotuner's decisions (core/autotune.py) go to
# a private folder, never the user's cache
_PRIVATE = __import__("tempfile").mkdtemp(prefix="drdm-test-cache-")
os.environ.setdefault("NAPARI_DRDM_CACHE", _PRIVATE)
os.environ.setdefault("NAPARI_DRDM_AUTOTUNE_FILE", os.path.join(_PRIVATE, "autotune.json"))


def ref_path(name: str) -> Path:
    p = REF / name
    if not p.exists():
        pytest.skip(f"reference data not found: {p} (set NAPARI_DRDM_REFERENCE_DIR to the shared/reference folder)")
    return p


def one_line(text: str) -> str:
    """``text`` stripped, asserted to be a single line (what every refusal prints)."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def labelled_cases(tmp_path: Path, blob) -> Path:
    """A folder ``in`` of two 2D NIfTI images with labels (case0, case1: 40 x 36 and 30 x 44,
    spacing 0.8 x 0.9 mm), made by ``blob(shape, k) -> (image, labels)``; returns the folder."""
    import nibabel as nib
    d = tmp_path / "in"
    d.mkdir()
    for k, shape in enumerate([(40, 36), (30, 44)]):
        img, lab = blob(shape, k)
        aff = np.diag([0.8, 0.9, 1.5, 1.0])
        nib.save(nib.Nifti1Image(img, aff), str(d / f"case{k}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(d / f"case{k}_label.nii.gz"))
    return d


# A shell that starts a job in the background (`cmd &`, as CI runners and nohup scripts do) makes it
# ignore SIGINT; the ignore is inherited through exec, and Python then never raises KeyboardInterrupt.
# The tests that interrupt an export with SIGINT need the default: restore it here, so that this
# process and every child it starts get it.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def golden2d():
    return np.load(ref_path("golden_2d.npz"))


@pytest.fixture(scope="session")
def golden2d_net():
    return np.load(ref_path("golden_2d_network.npz"))


@pytest.fixture(scope="session")
def golden3d():
    return np.load(ref_path("golden_3d.npz"))


@pytest.fixture(scope="session")
def ref_net2d():
    from napari_drdm.checkpoint import read_checkpoint
    from napari_drdm.core.network import DRDMNet
    state, cfg, _ = read_checkpoint(ref_path("upstream_cmr2d.pth"))
    net = DRDMNet(2)
    net.load_state_dict(state, strict=True)
    return net.eval()


@pytest.fixture(scope="session")
def ref_net3d():
    from napari_drdm.checkpoint import read_checkpoint
    from napari_drdm.core.network import DRDMNet
    state, cfg, _ = read_checkpoint(ref_path("random_init_3d.pth"))
    net = DRDMNet(3)
    net.load_state_dict(state, strict=True)
    return net.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory for randomly initialised checkpoints of the real architecture (CLI, export, GUI tests).

    ``tiny_checkpoint(ndim=2, size=32, seed=0, silent_head=False, name=None, path=None, **config)``
    writes one and returns its path as a string: ``path`` when given, else ``<name>.safetensors``
    (default ``tiny<ndim>d``; the model's display name) in a fresh temporary folder.
    ``silent_head`` zeroes the output convolution, so the recovery adds nothing (phi = psi_{T':1});
    ``config`` goes to ``DRDMConfig.default`` (e.g. ``field_scale``, ``sigma``)."""
    from napari_drdm.checkpoint import write_checkpoint
    from napari_drdm.core.config import DRDMConfig
    from napari_drdm.core.network import DRDMNet

    def make(ndim: int = 2, size: int = 32, seed: int = 0, silent_head: bool = False, name=None, path=None,
             **cfg_kw) -> str:
        if path is None:
            path = tmp_path_factory.mktemp("ckpt") / f"{name or f'tiny{ndim}d'}.safetensors"
        torch.manual_seed(seed)
        state = DRDMNet(ndim).state_dict()
        if silent_head:
            state["conv_out.weight"].zero_()
            state["conv_out.bias"].zero_()
        cfg = DRDMConfig.default(ndim, size=size, **cfg_kw)
        write_checkpoint(path, state, cfg, {"note": "random init, tests only"}, overwrite=True)
        return str(path)
    return make


@pytest.fixture
def tiny_ckpt2d(tiny_checkpoint):
    return tiny_checkpoint(2, 32)


@pytest.fixture
def tiny_ckpt3d(tiny_checkpoint):
    return tiny_checkpoint(3, 32)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts with torch on one CPU thread (tests share two cores with each other's
    subprocesses and the viewer) and gives back the thread count it found, whatever it set."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def dicom_slice():
    """Writer of one 16-bit CT DICOM slice: ``dicom_slice(path, z, pixels, series=..., slope=1.0,
    intercept=0.0, instance=None)``; pixel spacing 0.7 x 0.8 mm, position (0, 0, z), and a
    SliceThickness (5 mm) that is deliberately not the spacing of the positions."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    def write(path, z, pixels, series="1.2.826.0.1.3680043.2.1125.1", slope=1.0, intercept=0.0, instance=None):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelSpacing = [0.7, 0.8]                      # row spacing (along axis 0), column spacing
        ds.SliceThickness = 5.0
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        if instance is not None:
            ds.InstanceNumber = int(instance)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.asarray(pixels).astype(np.int16).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
    return write
