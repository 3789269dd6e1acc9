"""The export and the command line under hostile input (issue 14).

Every test is named for the guarantee it protects: no write outside the output root, one writer
per output folder, --resume only over the same inputs and weights, unusable inputs skipped at
whatever stage they fail, no silent wrong result, and every user error one line naming the input
or option (never a traceback) with a non-zero exit code.  Tiny images and a tiny random network.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_drdm.checkpoint import CheckpointError
from napari_drdm.cli import _parse, build_parser, main
from napari_drdm.export import ExportOptions, reproduce_row, run_export, verify_row
from napari_drdm.export import engine as export_engine
from napari_drdm.safety import (
    OutputError,
    OutputLock,
    OutputLockedError,
    UnsafePathError,
    check_memory,
    confine,
    estimate_export_bytes,
    writable_array,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint(2, 16)


def _img(shape=(20, 18), seed=0, dtype=np.int16):
    rng = np.random.default_rng(seed)
    return (rng.normal(300, 50, shape)).astype(dtype)


def _nii(path, arr):
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), str(path))
    return path


def _folder(root: Path, n=2, labels=True) -> Path:
    d = root / "in"
    d.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        _nii(d / f"case{k}.nii.gz", _img(seed=k))
        if labels:
            lab = np.zeros((20, 18), np.uint8)
            lab[5:12, 4:10] = 3
            _nii(d / f"case{k}_label.nii.gz", lab)
    return d


def _opts(ckpt, **kw):
    base = dict(per_image=1, t_prime="1", schedule="paper", batch=2, weights=ckpt)
    base.update(kw)
    return ExportOptions(**base)


def _start_export(src, out, ckpt):
    """A long export in a subprocess, returned once its journal holds 2 rows (or it ended)."""
    cmd = [sys.executable, "-m", "napari_drdm.cli", *_cli(src, out, "--weights", ckpt, "-n", "300", "--batch", "1",
                                                          "--threads", "1")]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    journal = out / "journal-0-of-1.jsonl"
    t0 = time.time()
    while time.time() - t0 < 300 and proc.poll() is None:
        if journal.exists() and journal.read_text().count('"type": "row"') >= 2:
            break
        time.sleep(0.05)
    return proc, cmd, journal


def _cli(*args):
    return ["augment", *map(str, args), "--t-prime", "1", "--schedule", "paper", "--no-progress"]


def _one_line_error(err: str, *names):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for n in names:
        assert n in lines[0], (n, err)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ckpt):
    """A finished export (2 inputs, 1 output each) that tests copy before changing."""
    root = tmp_path_factory.mktemp("finished")
    src = _folder(root)
    out = root / "out"
    run_export(src, out, _opts(ckpt))
    return src, out


def _copy(finished, tmp_path):
    src, out = finished
    dst = tmp_path / "out"
    shutil.copytree(out, dst)
    return src, dst


# ------------------------------------------------------------------ writes confined to the output root
def test_confine_refuses_absolute_dotdot_and_symlinks_out(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert confine(root, "images/a.nii.gz") == (root / "images" / "a.nii.gz").resolve()
    for bad in (str(outside / "x.nii.gz"), "../elsewhere/x.nii.gz", "images/../../x", ".", ""):
        with pytest.raises(UnsafePathError):
            confine(root, bad)
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="outside the output folder"):
        confine(root, "link/x.nii.gz")
    (root / "f.nii.gz").symlink_to(outside / "target.nii.gz")
    with pytest.raises(UnsafePathError):
        confine(root, "f.nii.gz")


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_reproduce_never_writes_outside_outdir(tmp_path, finished, ckpt, where, capsys):
    _, out = _copy(finished, tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    victim = tmp_path / "victim.nii.gz"
    victim.write_bytes(b"precious")
    check = tmp_path / "check"
    check.mkdir()
    row = m["rows"][0]
    if where == "absolute":
        row["image"] = str(victim)
    elif where == "dotdot":
        row["image"] = "../victim.nii.gz"
    else:
        (check / "images").symlink_to(tmp_path, target_is_directory=True)
        row["image"] = "images/victim.nii.gz"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UnsafePathError):
        reproduce_row(out / "manifest.json", row["row_id"], check)
    rc = main(["augment", "--reproduce", str(out / "manifest.json"), row["row_id"], str(check)])
    assert rc == 1
    _one_line_error(capsys.readouterr().err, "outside the output folder")
    assert victim.read_bytes() == b"precious"
    assert not any(p.is_file() for p in check.rglob("*") if not p.is_symlink())


def test_symlink_in_the_output_folder_pointing_out_is_refused(tmp_path, ckpt, capsys):
    src = _folder(tmp_path, n=1)
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "images").symlink_to(outside, target_is_directory=True)
    (out / "journal-0-of-1.jsonl").symlink_to(outside / "journal.jsonl")       # dangling: open("a") would create it
    assert main(_cli(src, out, "--weights", ckpt, "--overwrite")) == 1
    _one_line_error(capsys.readouterr().err, "outside the output folder")
    assert not list(outside.iterdir())


def test_reproduce_never_overwrites_without_overwrite(tmp_path, finished, ckpt):
    _, out = _copy(finished, tmp_path)
    row = json.loads((out / "manifest.json").read_text())["rows"][0]
    res = reproduce_row(out / "manifest.json", row["row_id"], tmp_path / "check")
    assert all(res["identical"].values())
    target = tmp_path / "check" / row["image"]
    target.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        reproduce_row(out / "manifest.json", row["row_id"], tmp_path / "check")
    assert target.read_bytes() == b"mine"
    res = reproduce_row(out / "manifest.json", row["row_id"], tmp_path / "check", overwrite=True)
    assert all(res["identical"].values())


# ------------------------------------------------------------------ one writer per output folder
def test_second_writer_is_refused_before_any_work(tmp_path, ckpt, monkeypatch, capsys):
    src = _folder(tmp_path)
    out = tmp_path / "out"

    def no_model(*a, **k):
        raise AssertionError("the model was loaded although the folder is locked")

    monkeypatch.setattr("napari_drdm.model.load_model", no_model)
    with OutputLock(out, what="test holder"):
        rc = main(_cli(src, out, "--weights", ckpt))
        err = capsys.readouterr().err
        _one_line_error(err, "another drdm process", str(out), "test holder")
        assert rc == 1
        assert not (out / "run.json").exists() and not (out / "journal-0-of-1.jsonl").exists()
        img = _nii(tmp_path / "x.nii.gz", _img())
        assert main(["generate", str(img), "--weights", ckpt, "--out", str(out)]) == 1
        _one_line_error(capsys.readouterr().err, "another drdm process")
    # released on exit: the same command now runs
    monkeypatch.undo()
    assert main(_cli(src, out, "--weights", ckpt)) == 0


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".drdm.lock").write_text("pid 999999999: drdm export augment")   # left by a killed writer
    with OutputLock(out) as lock:
        assert lock.stale and "999999999" in lock.stale
        assert str(os.getpid()) in (out / ".drdm.lock").read_text()


def test_shards_share_a_folder_but_not_a_shard_or_an_unsharded_run(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out, (0, 2)), OutputLock(out, (1, 2)):
        with pytest.raises(OutputLockedError):
            OutputLock(out, (0, 2)).__enter__()
        with pytest.raises(OutputLockedError):
            OutputLock(out).__enter__()
    with OutputLock(out):
        with pytest.raises(OutputLockedError):
            OutputLock(out, (1, 2)).__enter__()


def test_two_concurrent_writers_lose_no_record(tmp_path, ckpt, capsys):
    src = _folder(tmp_path)
    out = tmp_path / "out"
    a, cmd, journal = _start_export(src, out, ckpt)
    try:
        for extra in ([], ["--resume"]):          # the same command, and a --resume, while the first one runs
            assert main(cmd[3:] + extra) == 1
            _one_line_error(capsys.readouterr().err, "another drdm process", f"pid {a.pid}")
        assert a.poll() is None, "the first writer ended before the second one started: make it longer"
    finally:
        a.send_signal(signal.SIGINT)
        _, err_a = a.communicate(timeout=300)
    assert a.returncode == 130, err_a
    m = json.loads((out / "manifest.json").read_text())
    assert m["n_rows"] == journal.read_text().count('"type": "row"') >= 1
    assert all(verify_row(out, r) for r in m["rows"])
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*.nii.gz")}
    assert on_disk == {r[k] for r in m["rows"] for k in ("image", "labels", "ddf")}     # no file outside the manifest


# ------------------------------------------------------------------ resume conditions
def test_resume_refuses_a_different_input_set(tmp_path, finished, ckpt, capsys):
    src, out = _copy(finished, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _nii(other / "zzz.nii.gz", _img(seed=9))
    with pytest.raises(FileExistsError, match="different input set"):
        run_export([src, other], out, _opts(ckpt, resume=True))
    assert main(_cli(other, out, "--weights", ckpt, "--resume", "--no-fold-guard")) == 1   # as `finished` was made
    _one_line_error(capsys.readouterr().err, "different input set", "--resume")
    assert json.loads((out / "manifest.json").read_text())["n_rows"] == 2     # nothing mixed in


def test_resume_refuses_other_weights(tmp_path, finished, tiny_checkpoint):
    src, out = _copy(finished, tmp_path)
    other = tiny_checkpoint(2, 16, seed=3)
    # same name, different file: the recorded sha256 tells them apart
    shutil.copy(other, tmp_path / "tiny2d.safetensors")
    with pytest.raises(FileExistsError, match="weights"):
        run_export(src, out, _opts(str(tmp_path / "tiny2d.safetensors"), resume=True))


@pytest.mark.parametrize("layout", ["same", "inside", "input_inside_out"])
def test_output_folder_may_not_be_or_hold_an_input(tmp_path, ckpt, layout, monkeypatch, capsys):
    src = _folder(tmp_path)
    monkeypatch.setattr("napari_drdm.model.load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = {"same": src, "inside": src / "aug", "input_inside_out": tmp_path}[layout]
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(_cli(src, out, "--weights", ckpt, *extra)) == 1
        _one_line_error(capsys.readouterr().err, "output folder")
    assert not list(src.rglob("*_aug000*")) and not (src / "run.json").exists()


# ------------------------------------------------------------------ unusable inputs, any stage
def _pixels(shape=(12, 10)):
    return (np.arange(shape[0] * shape[1]) % 50).reshape(shape)


def test_dicom_folder_with_two_series_is_refused_naming_them_or_read_by_uid(tmp_path, dicom_slice):
    pytest.importorskip("pydicom")
    from napari_drdm.io import read_image
    d = tmp_path / "ser"
    d.mkdir()
    for z in range(3):
        dicom_slice(d / f"a{z}.dcm", z, _pixels(), series="1.2.3", instance=z)
        dicom_slice(d / f"b{z}.dcm", z + 0.5, _pixels(), series="1.2.4", instance=z)       # same size, interleaved positions
    with pytest.raises(ValueError, match="2 DICOM series.*1.2.3.*1.2.4"):
        read_image(d)
    v = read_image(d, series="1.2.4")
    assert v.data.shape == (3, 12, 10) and v.spacing[0] == pytest.approx(1.0)
    dicom_slice(d / "c.dcm", 7, _pixels((8, 8)), series="1.2.3", instance=7)
    with pytest.raises(ValueError, match="different sizes.*c.dcm"):
        read_image(d, series="1.2.3")


def test_non_dicom_file_in_a_series_skips_that_input_only_and_resume_does_not_retry(tmp_path, ckpt, capsys, dicom_slice):
    pytest.importorskip("pydicom")
    src = _folder(tmp_path, n=1)
    ser = src / "series1"
    ser.mkdir()
    for z in range(3):
        dicom_slice(ser / f"s{z}.dcm", z, _pixels(), series="9.9", instance=z)
    (ser / "junk.dcm").write_text("not dicom")
    out = tmp_path / "out"
    opts = _opts(ckpt)
    s = run_export(src, out, opts)
    assert s["written"] == 1 and any("junk.dcm" in k["reason"] for k in s["skipped"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and any("junk.dcm" in k["reason"] for k in m["skipped"])
    # resume: the skipped input is not retried (its reason stays in the manifest) unless asked
    s2 = run_export(src, out, _opts(ckpt, resume=True))
    assert s2["written"] == 0 and s2["complete"]
    assert any("junk.dcm" in k["reason"] for k in json.loads((out / "manifest.json").read_text())["skipped"])
    (ser / "junk.dcm").unlink()
    assert run_export(src, out, _opts(ckpt, resume=True))["written"] == 0          # still not retried
    s3 = run_export(src, out, _opts(ckpt, resume=True, retry_skipped=True))     # 3D input, 2D weights:
    assert s3["written"] == 0 and "3D image" in s3["skipped"][0]["reason"]       # skipped again, other reason


def test_float16_uint64_and_huge_int64_inputs_are_written_whole(tmp_path, ckpt):
    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "half.npy", _img().astype(np.float16))
    np.save(src / "big.npy", _img(seed=1).astype(np.uint64))
    np.save(src / "wide.npy", _img(seed=2).astype(np.float32))
    lab = np.zeros((20, 18), np.int64)
    lab[4:9, 3:8] = 2 ** 40                               # beyond int32: kept as int64, not dropped
    np.save(src / "wide_label.npy", lab)
    out = tmp_path / "out"
    s = run_export(src, out, _opts(ckpt))
    assert s["written"] == 3 and s["complete"] and not s["skipped"]
    assert np.asanyarray(nib.load(str(out / "images" / "half_aug000.nii.gz")).dataobj).dtype == np.float32
    labs = np.asanyarray(nib.load(str(out / "labels" / "wide_aug000.nii.gz")).dataobj)
    assert labs.dtype == np.int64 and set(np.unique(labs)) <= {0, 2 ** 40}
    assert (out / "ddfs" / "wide_aug000_ddf.nii.gz").exists()
    assert main(["generate", str(src / "half.npy"), "--weights", ckpt, "--t-prime", "1",
                 "--out", str(tmp_path / "g")]) == 0
    assert np.asanyarray(nib.load(str(tmp_path / "g" / "half_image.nii.gz")).dataobj).dtype == np.float32


def test_writable_array_converts_or_refuses():
    assert writable_array(np.ones(3, np.float16), "x").dtype == np.float32
    assert writable_array(np.array([1, 2], np.int64), "x").dtype == np.int32
    assert writable_array(np.array([2 ** 40], np.int64), "x").dtype == np.int64
    assert writable_array(np.array([True]), "x").dtype == np.uint8
    with pytest.raises(OutputError, match="cannot be written"):
        writable_array(np.ones(2, np.complex64), "x.nii.gz")


def test_huge_pixel_values_and_float_labels_are_refused_not_garbled(tmp_path, ckpt):
    from napari_drdm.model import load_model
    model = load_model(ckpt)
    img = _img().astype(np.float32)
    img[0, 0], img[1, 1] = 3e38, -3e38
    with pytest.raises(ValueError, match="too wide"):
        model.generate(img, t_prime=1)
    lab = np.zeros((20, 18), np.float64)
    lab[2:5, 2:5] = 1e20
    lab[6:9, 6:9] = 2e20
    with pytest.raises(ValueError, match="label map holds values up to"):
        model.generate(_img(), lab, t_prime=1)
    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "huge.npy", img)
    np.save(src / "ok.npy", _img())
    np.save(src / "ok_label.npy", lab)
    s = run_export(src, tmp_path / "out", _opts(ckpt))
    reasons = {Path(k["path"]).name: k["reason"] for k in s["skipped"]}
    assert "too wide" in reasons["huge.npy"] and "label map holds values" in reasons["ok.npy"]
    assert s["written"] == 0


def test_nan_weights_are_refused_at_load(tmp_path, capsys, tiny_checkpoint):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    good = tiny_checkpoint(2, 16)
    state = load_file(str(good))
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    state["conv_out.weight"][:] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=meta)
    from napari_drdm.model import load_model
    with pytest.raises(CheckpointError, match="conv_out.weight.*NaN"):
        load_model(str(bad))
    img = _nii(tmp_path / "x.nii.gz", _img())
    assert main(["generate", str(img), "--weights", str(bad), "--out", str(tmp_path / "o")]) == 1
    _one_line_error(capsys.readouterr().err, "bad.safetensors", "NaN")


def test_api_refuses_non_integer_t_prime_and_bad_k(ckpt):
    from napari_drdm.model import load_model
    model = load_model(ckpt)
    for kw, name in (({"t_prime": 10.7}, "t_prime"), ({"k": 0}, "k"), ({"k": -1}, "k"), ({"seed": 10 ** 23}, "seed"),
                     ({"t_prime": "x"}, "t_prime")):
        with pytest.raises(ValueError, match=name):
            model.generate(_img(), **dict({"t_prime": 1}, **kw))
    x = torch.zeros(1, 1, 16, 16)
    with pytest.raises(ValueError, match="t_prime"):
        model.generate_model_grid(x, 1.5, [0])


def test_nan_output_is_refused_and_skips_only_its_input(tmp_path, ckpt, monkeypatch):
    src = _folder(tmp_path)
    real = export_engine.compute_batch

    def poisoned(members, opts):
        outs = real(members, opts)
        for (_, job), o in zip(members, outs):
            if job.name == "case1":
                o["ddf"][:] = np.nan
        return outs

    monkeypatch.setattr(export_engine, "compute_batch", poisoned)
    out = tmp_path / "out"
    s = run_export(src, out, _opts(ckpt, per_image=2))
    assert s["written"] == 2 and [k["name"] for k in s["skipped"]] == ["case1"]
    assert "NaN" in s["skipped"][0]["reason"]
    assert not list(out.rglob("case1_aug*"))                          # nothing of it was written
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["n_rows"] == 2 and m["skipped"][0]["name"] == "case1"


def test_generation_failure_skips_only_the_failing_input(tmp_path, ckpt, monkeypatch):
    src = _folder(tmp_path)
    real = export_engine.compute_batch

    def fragile(members, opts):
        if any(j.name == "case0" for _, j in members):
            raise RuntimeError("boom")
        return real(members, opts)

    monkeypatch.setattr(export_engine, "compute_batch", fragile)
    s = run_export(src, tmp_path / "out", _opts(ckpt, per_image=2, batch=4))
    assert s["written"] == 2 and s["skipped"][0]["name"] == "case0" and "boom" in s["skipped"][0]["reason"]
    assert s["complete"]


def test_output_with_a_new_label_value_is_refused(tmp_path, ckpt, monkeypatch):
    src = _folder(tmp_path, n=1)
    real = export_engine.compute_batch

    def relabel(members, opts):
        outs = real(members, opts)
        outs[0]["labels"] = outs[0]["labels"].copy()
        outs[0]["labels"][0, 0] = 77
        return outs

    monkeypatch.setattr(export_engine, "compute_batch", relabel)
    s = run_export(src, tmp_path / "out", _opts(ckpt))
    assert s["written"] == 0 and "[77]" in s["skipped"][0]["reason"]


# ------------------------------------------------------------------ memory
def test_memory_estimate_names_the_option_that_fits():
    est = estimate_export_bytes((64, 64), 4, 256, (10, 20, 40), batch=8)
    per = est["model_grid"] / 8
    with pytest.raises(MemoryError, match="--batch 2 would fit"):
        check_memory(est, int(est["input_grid"] + 2.5 * per), "img.nii.gz", batch=8)
    with pytest.raises(MemoryError, match="downsample"):
        check_memory(est, int(est["input_grid"] / 2), "img.nii.gz", batch=8)
    big = estimate_export_bytes((12000, 12000), 4, 256, (10, 20, 40), batch=1)
    assert big["input_grid"] > 576e6 * 4                       # the 12000^2 case is not underestimated
    check_memory(est, est["total"], "img.nii.gz", batch=8)     # fits: no error


def test_memory_refusal_before_work(tmp_path, ckpt, capsys, monkeypatch):
    src = _folder(tmp_path, n=1)
    s = run_export(src, tmp_path / "out", _opts(ckpt, max_memory=1e-6))
    assert s["written"] == 0 and "needs about" in s["skipped"][0]["reason"]
    # a budget that --batch 1 fits but --batch 8 does not: the run stops at once, naming --batch
    est = estimate_export_bytes((20, 18), 2, 16, (10, 20, 40), batch=8, labels=True)
    fits_one = est["input_grid"] + 1.5 * est["model_grid"] / 8
    with pytest.raises(MemoryError, match="--batch 1 would fit"):
        run_export(src, tmp_path / "out2", _opts(ckpt, batch=8, max_memory=fits_one / 1e9))
    assert not list((tmp_path / "out2").rglob("*.nii.gz"))
    img = _nii(tmp_path / "x.nii.gz", _img())
    monkeypatch.setattr("napari_drdm.model.DRDM.generate", lambda *a, **k: pytest.fail("generated"))
    assert main(["generate", str(img), "--weights", ckpt, "--out", str(tmp_path / "g"), "--max-memory", "1e-6"]) == 1
    _one_line_error(capsys.readouterr().err, "x.nii.gz", "needs about", "available")
    assert not list((tmp_path / "g").glob("*.nii.gz"))


# ------------------------------------------------------------------ output folder checked before work
def test_generate_checks_the_output_folder_before_computing(tmp_path, ckpt, monkeypatch, capsys):
    img = _nii(tmp_path / "x.nii.gz", _img())
    monkeypatch.setattr("napari_drdm.model.load_model", lambda *a, **k: pytest.fail("model loaded"))
    notdir = tmp_path / "file"
    notdir.write_text("")
    assert main(["generate", str(img), "--weights", ckpt, "--out", str(notdir)]) == 1
    _one_line_error(capsys.readouterr().err, str(notdir), "not a folder")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x_image.nii.gz").write_bytes(b"earlier result")
    assert main(["generate", str(img), "--weights", ckpt, "--out", str(full)]) == 1
    _one_line_error(capsys.readouterr().err, "x_image.nii.gz", "--overwrite")
    assert (full / "x_image.nii.gz").read_bytes() == b"earlier result"
    assert main(["generate", str(img), "--weights", ckpt, "--out", str(full), "--prefix", "../escape"]) == 1
    _one_line_error(capsys.readouterr().err, "outside the output folder")
    src = _folder(tmp_path / "data", n=1)
    assert main(_cli(src, notdir, "--weights", ckpt)) == 1
    _one_line_error(capsys.readouterr().err, "not a folder")


def test_merge_of_a_mistyped_folder_creates_nothing(tmp_path, capsys):
    typo = tmp_path / "ouy"
    assert main(["augment", "--merge", str(typo)]) == 1
    _one_line_error(capsys.readouterr().err, str(typo), "not the output folder")
    assert not typo.exists()


# ------------------------------------------------------------------ interruption
def test_interrupt_message_counts_what_the_journal_holds(tmp_path, ckpt, monkeypatch, capsys):
    src = _folder(tmp_path)
    out = tmp_path / "out"
    real = export_engine.Journal.append
    rows = [0]

    def append(self, record):       # Ctrl-C lands right after the 2nd row reached the journal
        real(self, record)
        if record.get("type") == "row":
            rows[0] += 1
            if rows[0] == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(export_engine.Journal, "append", append)
    assert main(_cli(src, out, "--weights", ckpt, "-n", "2", "--batch", "1")) == 130
    err = capsys.readouterr().err
    assert "after 2 new outputs" in err and "--resume" in err
    assert json.loads((out / "manifest.json").read_text())["n_rows"] == 2


def test_sigterm_ends_like_ctrl_c(tmp_path, ckpt):
    src = _folder(tmp_path)
    out = tmp_path / "out"
    proc, _, journal = _start_export(src, out, ckpt)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    n_journal = journal.read_text().count('"type": "row"')
    assert f"after {n_journal} new outputs" in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["n_rows"] == n_journal and all(verify_row(out, r) for r in m["rows"])
    assert not list(out.rglob("*.part-*"))
    assert not (out / ".drdm.lock").read_text().strip()          # released


# ------------------------------------------------------------------ one line per user error
BAD_OPTIONS = [
    (["--device", "bogus"], "--device"),
    (["--threads", "-1"], "--threads"),
    (["--size", "0"], "--size"),
    (["--seed", str(10 ** 23)], "--seed"),
    (["--k", "-1"], "--k"),
    (["--k", "0"], "--k"),
    (["-n", "0"], "--per-image"),
    (["--batch", "0"], "--batch"),
    (["--t-prime", "10.7"], "T'"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append((["--device", "cuda"], "--device cuda"))


@pytest.mark.parametrize("opt,name", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_naming_it(tmp_path, ckpt, opt, name, capsys, monkeypatch):
    src = _folder(tmp_path, n=1)
    monkeypatch.setattr("napari_drdm.model.load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as e:
        rc = main(["augment", str(src), str(tmp_path / "out"), "--weights", ckpt, "--no-progress", *opt])
        raise SystemExit(rc)
    assert e.value.code != 0
    _one_line_error(capsys.readouterr().err, name)
    assert not (tmp_path / "out" / "run.json").exists()


def test_generate_bad_options_are_one_line(tmp_path, ckpt, capsys):
    img = _nii(tmp_path / "x.nii.gz", _img())
    for opt, name in ((["--t-prime", "500"], "--t-prime"), (["--k", "0"], "--k"), (["--seed", "-1"], "--seed")):
        with pytest.raises(SystemExit) as e:
            raise SystemExit(main(["generate", str(img), "--weights", ckpt, "--out", str(tmp_path / "o"), *opt]))
        assert e.value.code != 0
        _one_line_error(capsys.readouterr().err, name)


def test_options_between_inputs_and_output_are_accepted():
    args = _parse(build_parser(), ["augment", "in1", "--per-image", "2", "in2", "--seed", "3", "out"])
    assert args.paths == ["in1", "in2", "out"] and args.per_image == 2 and args.seed == 3


def test_non_utf8_file_name_is_named_not_fatal(tmp_path, ckpt, capsys):
    src = _folder(tmp_path, n=1, labels=False)
    raw = os.fsencode(str(src)) + b"/bad\xff.nii.gz"
    _nii(os.fsdecode(raw), _img())
    rc = main(_cli(src, tmp_path / "out", "--weights", ckpt))
    err = capsys.readouterr().err
    assert rc == 0 and "bad\\xff.nii.gz" in err and "not valid UTF-8" in err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["n_rows"] == 1 and any("UTF-8" in k["reason"] for k in m["skipped"])
    assert main(["generate", os.fsdecode(raw), "--weights", ckpt, "--out", str(tmp_path / "g")]) == 1
    _one_line_error(capsys.readouterr().err, "bad\\xff.nii.gz", "UTF-8")


def test_memoryerror_and_unexpected_errors_are_one_line(monkeypatch, capsys, tmp_path):
    import napari_drdm.commands.info as info

    def oom(args):
        raise MemoryError()

    monkeypatch.setattr(info, "run", oom)
    assert main(["info"]) == 1
    _one_line_error(capsys.readouterr().err, "out of memory", "--batch")

    def bug(args):
        raise IndexError("index 3 is out of bounds\nsecond line")

    monkeypatch.setattr(info, "run", bug)
    assert main(["info"]) == 1
    _one_line_error(capsys.readouterr().err, "IndexError", "-v")
