"""Every bad input to the ``drdm`` command line ends in one line on stderr and a non-zero exit.

Each case runs in a fresh process through the console script's entry point
(``napari_drdm.cli:main``, run as ``python -m napari_drdm.cli`` so that this checkout's sources
are the ones tested), and the test asserts: exit code != 0, exactly one line on stderr, no
"Traceback", and the line names the input and what was expected.  The same errors are checked on
the Python API: one exception hierarchy (:mod:`napari_drdm.errors`) whose kinds are also the
built-in exceptions a caller would catch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_drdm.errors import CheckpointError, DeviceError, DRDMError, InputError, WeightsNotFoundError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _drdm(*argv, cwd=None):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "napari_drdm.cli", *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint):
    """Small inputs, good and bad, and a tiny 2D checkpoint."""
    d = tmp_path_factory.mktemp("cli_errors")
    ckpt = tiny_checkpoint(ndim=2, size=32, path=d / "tiny.safetensors")
    img = np.zeros((32, 32), np.float32)
    img[8:24, 8:24] = 1
    np.save(d / "img.npy", img)
    np.save(d / "float_labels.npy", img * 0.5)
    np.save(d / "small_labels.npy", np.zeros((16, 16), np.uint8))
    nan = img.copy()
    nan[3, 3] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "rgb.npy", np.zeros((32, 32, 3), np.float32))
    (d / "corrupt.pth").write_bytes(b"\x80\x04 not a checkpoint")
    (d / "in").mkdir()
    np.save(d / "in" / "case01.npy", img)
    (d / "manifest.json").write_text(json.dumps({"rows": [], "batches": {}, "run": {}}))
    return {"dir": d, "ckpt": ckpt, "img": d / "img.npy"}


def _case(name, argv, *expected):
    return pytest.param(argv, expected, id=name)


# argv entries of the form "{key}" are replaced by files[key] or by a path in the module's folder
CASES = [
    _case("device-unknown", ["generate", "{img}", "--out", "{out}", "--device", "tpu"], "--device", "expected auto"),
    _case("input-missing", ["generate", "{dir}/missing.nii.gz", "--out", "{out}", "--weights", "{ckpt}"],
          "missing.nii.gz", "not found"),
    _case("weights-unknown", ["generate", "{img}", "--out", "{out}", "--weights", "no-such-model"],
          "no-such-model", "known names"),
    _case("weights-file-missing", ["generate", "{img}", "--out", "{out}", "--weights", "{dir}/gone.safetensors"],
          "gone.safetensors", "not found"),
    _case("weights-corrupt", ["generate", "{img}", "--out", "{out}", "--weights", "{dir}/corrupt.pth"],
          "corrupt.pth", "cannot read"),
    _case("t-prime-fraction", ["generate", "{img}", "--out", "{out}", "--weights", "{ckpt}", "--t-prime", "10.7"],
          "--t-prime", "integer"),
    _case("t-prime-too-large", ["generate", "{img}", "--out", "{out}", "--weights", "{ckpt}", "--t-prime", "999"],
          "--t-prime", "0..80"),
    _case("seed-negative", ["generate", "{img}", "--out", "{out}", "--seed", "-1"], "--seed", "expected an integer"),
    _case("size-not-multiple-of-8", ["generate", "{img}", "--out", "{out}", "--size", "12"], "--size", "multiple of 8"),
    _case("max-memory-negative", ["generate", "{img}", "--out", "{out}", "--max-memory", "-1"],
          "--max-memory", "positive"),
    _case("labels-float", ["generate", "{img}", "--labels", "{dir}/float_labels.npy", "--out", "{out}",
                           "--weights", "{ckpt}"], "labels", "integer"),
    _case("labels-shape", ["generate", "{img}", "--labels", "{dir}/small_labels.npy", "--out", "{out}",
                           "--weights", "{ckpt}"], "small_labels.npy", "shape"),
    _case("image-nan", ["generate", "{dir}/nan.npy", "--out", "{out}", "--weights", "{ckpt}"], "nan.npy", "NaN"),
    _case("image-rgb", ["generate", "{dir}/rgb.npy", "--out", "{out}", "--weights", "{ckpt}"], "rgb.npy", "RGB"),
    _case("augment-no-output", ["augment", "{dir}/in"], "IN [IN ...] OUT"),
    _case("augment-t-prime-spec", ["augment", "{dir}/in", "{out}", "--weights", "{ckpt}", "--t-prime", "4x"],
          "'4x'", "expected a number"),
    _case("augment-shard", ["augment", "{dir}/in", "{out}", "--weights", "{ckpt}", "--shard", "5/2"],
          "--shard", "0 <= i < n"),
    _case("compose-padding", ["generate", "{img}", "--out", "{out}", "--compose-padding", "reflection"],
          "--compose-padding", "border"),
    _case("augment-compose-padding", ["augment", "{dir}/in", "{out}", "--compose-padding", "edge"],
          "--compose-padding", "zeros"),
    _case("augment-label-interp", ["augment", "{dir}/in", "{out}", "--label-interp", "cubic"],
          "--label-interp", "nearest"),
    _case("augment-out-inside-input", ["augment", "{dir}/in", "{dir}/in/out", "--weights", "{ckpt}"],
          "inside the input", "choose an output folder"),
    _case("augment-reproduce-unknown-row", ["augment", "--reproduce", "{dir}/manifest.json", "row9", "{out}"],
          "row9", "not in the manifest"),
    _case("evaluate-images-missing", ["evaluate", "--weights", "{ckpt}", "--images", "{dir}/none.npz"],
          "none.npz", "not found"),
    _case("evaluate-t-prime", ["evaluate", "--weights", "{ckpt}", "--images", "{img}", "--t-prime", "30", "81"],
          "--t-prime", "0..80"),
    _case("evaluate-slice-axes", ["evaluate", "--weights", "{ckpt}", "--images", "{img}", "--slice-axes", "x"],
          "--slice-axes", "expected an integer"),
    _case("evaluate-samples", ["evaluate", "--weights", "{ckpt}", "--images", "{img}", "--samples", "0"],
          "--samples", ">= 1"),
    _case("info-tune-size", ["info", "--tune", "2d250"], "--tune", "divisible by 8"),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv,expected", CASES)
def test_bad_input_is_one_line_and_no_traceback(files, tmp_path, argv, expected):
    subs = {"img": files["img"], "ckpt": files["ckpt"], "dir": files["dir"], "out": tmp_path / "out"}
    argv = [a.format(**subs) for a in argv]
    r = _drdm(*argv)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"drdm {argv[0]}: error: "), lines[0]
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.nii.gz"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_device_cuda_without_cuda_is_one_line(files, tmp_path):
    r = _drdm("generate", files["img"], "--out", tmp_path / "out", "--device", "cuda")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--device cuda" in lines[0] and "no CUDA GPU" in lines[0]


# ------------------------------------------------------------------ the same errors on the Python API
def test_error_kinds_are_also_the_builtin_exceptions(files):
    from napari_drdm import load_model
    from napari_drdm.checkpoint import read_checkpoint
    from napari_drdm.model import pick_device
    from napari_drdm.weights import resolve_weights

    with pytest.raises(WeightsNotFoundError, match="unknown weights 'nope'") as e:
        resolve_weights("nope")
    assert isinstance(e.value, LookupError) and str(e.value).startswith("unknown weights")   # no KeyError quotes
    for missing in (files["dir"] / "gone.safetensors",):
        with pytest.raises(WeightsNotFoundError, match="not found"):
            resolve_weights(missing)
        with pytest.raises(WeightsNotFoundError, match="not found"):
            read_checkpoint(missing)
    with pytest.raises(CheckpointError, match="cannot read") as e:
        load_model(files["dir"] / "corrupt.pth")
    assert isinstance(e.value, ValueError) and isinstance(e.value, DRDMError)
    with pytest.raises(DeviceError) as e:
        pick_device("tpu")
    assert isinstance(e.value, ValueError)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            pick_device("cuda")
    model = load_model(files["ckpt"], device="cpu")
    img = np.load(files["img"])
    with pytest.raises(InputError, match="integer") as e:        # float labels: one kind, API and widgets alike
        model.generate(img, img * 0.5, t_prime=1)
    assert isinstance(e.value, ValueError)
