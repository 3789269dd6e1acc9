"""Dataset export (Algorithms 3 and 4): `drdm augment`, `drdm synthesize-pairs`, manifest,
reproduction, resume, bad inputs, sharding, inverse fields and the on-the-fly transform.

Tiny random checkpoints (2D S=32, 3D S=16), T' of 1-3 with the paper loop: a few network passes
per test.  "Smooth" checkpoints have a zeroed output head, so phi is the forward field psi_{T':1}
(smooth, mostly invertible): used where a test needs a well-behaved field.
"""
from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_drdm.cli import main
from napari_drdm.core.spatial import invert_field
from napari_drdm.errors import InputError
from napari_drdm.export import (
    ExportOptions,
    discover,
    load_manifest,
    parse_t_prime,
    reproduce_row,
    run_export,
    verify_row,
)
from napari_drdm.export import sample as export_sample
from napari_drdm.outputs import nifti_array_to_ddf


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint):
    # smooth2d: phi = psi_{T':1}, enlarged so that a few steps give a visible, fold-free field
    return {"2d": tiny_checkpoint(2, 32, name="rand2d"), "3d": tiny_checkpoint(3, 16, name="rand3d"),
            "smooth2d": tiny_checkpoint(2, 32, name="smooth2d", silent_head=True, field_scale="geometric",
                                        sigma=8e-5)}


AFF2 = np.array([[0.8, 0, 0, 10.0], [0, 0.9, 0, -5.0], [0, 0, 1.5, 3.0], [0, 0, 0, 1]])
AFF3 = np.array([[-1.2, 0, 0, 50.0], [0, 1.0, 0, -20.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])


def _phantom(shape, seed=0, noise=10.0):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = sum(g ** 2 for g in grids)
    img = 800 * np.exp(-r2 * 3) + 200 * np.tanh(4 * grids[0]) + rng.normal(0, noise, shape)
    lab = np.zeros(shape, np.uint8)
    lab[r2 < 0.3] = 2
    lab[(r2 >= 0.3) & (r2 < 0.6)] = 5
    return img.astype(np.int16), lab


def _save(path, arr, aff, descrip=b"drdm test"):
    im = nib.Nifti1Image(arr, aff)
    im.header["descrip"] = descrip
    im.header.set_xyzt_units("mm", "sec")
    nib.save(im, str(path))


@pytest.fixture
def folder2d(tmp_path):
    d = tmp_path / "in2d"
    d.mkdir()
    for k, shape in enumerate([(40, 36), (30, 44)]):
        img, lab = _phantom(shape, k)
        _save(d / f"case{k}.nii.gz", img, AFF2)
        _save(d / f"case{k}_label.nii.gz", lab, AFF2)
    return d


def _opts(**kw):
    base = dict(per_image=2, t_prime="1", schedule="paper", batch=2)
    base.update(kw)
    return ExportOptions(**base)


# ------------------------------------------------------------------------------------ spec
def test_t_prime_specs():
    assert parse_t_prime("45", 3) == [45, 45, 45]
    assert parse_t_prime("40,45,50", 4) == [40, 45, 50, 40]
    assert parse_t_prime("40:52:2", 7) == [40, 42, 44, 46, 48, 50, 52]       # stop included
    ref = parse_t_prime("reference", 32)
    assert ref[:7] == [48, 50, 50, 52, 52, 54, 54] and ref[-1] == 80         # reference script, 32 augmentations
    assert parse_t_prime("reference", 40)[-1] == 80                          # capped at T
    for bad in ("abc", "90", "5:1:0", ""):
        with pytest.raises(ValueError, match="T'"):
            parse_t_prime(bad, 2)


def test_naming_rules(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.nii.gz", "a_label.nii.gz", "b.nrrd", "b_seg.nii", "c.png", "c_labels.png", "d.nii.gz",
                 "orphan_label.nii.gz", "notes.txt"):
        (flat / name).write_bytes(b"x")
    samples, skipped = discover(flat)
    got = {s.name: (Path(s.image).name, s.labels and Path(s.labels).name) for s in samples}
    assert got == {"a": ("a.nii.gz", "a_label.nii.gz"), "b": ("b.nrrd", "b_seg.nii"),
                   "c": ("c.png", "c_labels.png"), "d": ("d.nii.gz", None)}
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert "without a matching image" in reasons["orphan_label.nii.gz"] and "unsupported" in reasons["notes.txt"]
    split = tmp_path / "split"
    (split / "images").mkdir(parents=True)
    (split / "labels").mkdir()
    for name in ("x.nii.gz", "y.nii.gz"):
        (split / "images" / name).write_bytes(b"x")
    (split / "labels" / "x.nii.gz").write_bytes(b"x")
    (split / "labels" / "y_seg.nii.gz").write_bytes(b"x")
    samples, _ = discover([split, flat / "a.nii.gz"])        # a list of inputs; a file finds its labels beside it
    assert [(s.name, Path(s.labels).parent.name) for s in samples] == [("x", "labels"), ("y", "labels"), ("a", "flat")]


# ------------------------------------------------------------------------------------ Algorithm 3
def test_augment_2d_3d_folder_labels_affines_manifest_reproduce(tmp_path, ckpts, monkeypatch, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    img2, lab2 = _phantom((40, 36))
    _save(d / "slice.nii.gz", img2, AFF2)
    _save(d / "slice_label.nii.gz", lab2, AFF2)
    img3, lab3 = _phantom((20, 18, 16), 1)
    _save(d / "vol.nii.gz", img3.astype(np.float32), AFF3)
    _save(d / "vol_seg.nii.gz", lab3, AFF3)
    # no --weights: the model of each input's dimension (the bundled ones, here tiny stand-ins)
    monkeypatch.setattr(export_sample, "DEFAULT_WEIGHTS", {2: ckpts["2d"], 3: ckpts["3d"]})
    out = tmp_path / "out"
    n = 3
    summary = run_export(d, out, _opts(per_image=n))
    assert summary["complete"] and summary["written"] == 2 * n
    for name, img, lab, aff in (("slice", img2, lab2, AFF2), ("vol", img3.astype(np.float32), lab3, AFF3)):
        for i in range(n):
            im = nib.load(str(out / "images" / f"{name}_aug{i:03d}.nii.gz"))
            lb = nib.load(str(out / "labels" / f"{name}_aug{i:03d}.nii.gz"))
            ddf = nib.load(str(out / "ddfs" / f"{name}_aug{i:03d}_ddf.nii.gz"))
            for x in (im, lb, ddf):
                np.testing.assert_allclose(x.affine, aff)
                assert x.header["descrip"].tobytes().startswith(b"drdm test")  # the input's header travels
            a = np.asanyarray(im.dataobj)
            assert a.dtype == img.dtype and a.shape == img.shape
            assert img.min() <= a.min() and a.max() <= img.max()
            assert set(np.unique(np.asanyarray(lb.dataobj))) <= set(np.unique(lab))
            assert np.asanyarray(lb.dataobj).dtype == lab.dtype
            assert ddf.shape == img.shape + ((1,) if img.ndim == 3 else (1, 1)) + (img.ndim,)
            assert ddf.header.get_intent()[0] == "vector"
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["n_rows"] == 2 * n
    rows = {r["row_id"]: r for r in m["rows"]}
    r = rows["vol_aug001"]
    assert r["model"] == "rand3d" and r["t_prime"] == 1 and r["schedule"] == "paper" and r["k"] == 2
    assert len(r["source_sha256"]) == 64 and {"max_disp_pct", "mean_disp_pct", "folding_pct", "seed"} <= set(r)
    csv_lines = (out / "manifest.csv").read_text().splitlines()
    assert len(csv_lines) == 2 * n + 1 and csv_lines[0].startswith("row_id,")
    # a row that shared its batch with another output is regenerated bit for bit
    batched = [k for k, v in rows.items() if v["batch_size"] > 1 and v["batch_index"] == 1][0]
    res = reproduce_row(out / "manifest.json", batched, tmp_path / "again")
    assert res["identical"] and all(res["identical"].values()), res
    assert main(["augment", "--reproduce", str(out), "slice_aug002", str(tmp_path / "again2")]) == 0
    # a second run without a flag refuses and says why
    capsys.readouterr()
    assert main(["augment", str(d), str(out), "-n", "1", "--t-prime", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--resume" in err and "--overwrite" in err


def _interrupt_after(n_rows: int):
    """A progress hook that stops the export (as Ctrl-C does) once ``n_rows`` outputs are written."""
    seen = []

    def hook(ev):
        if ev.kind == "row":
            seen.append(ev.row["row_id"])
            if len(seen) == n_rows:
                raise KeyboardInterrupt
    return hook


def test_interrupt_then_resume(tmp_path, folder2d, ckpts):
    out = tmp_path / "out"
    opts = _opts(per_image=3, weights=ckpts["2d"], inverse=True)
    hook = _interrupt_after(2)
    with pytest.raises(KeyboardInterrupt):
        run_export(folder2d, out, opts, progress=hook)
    m = json.loads((out / "manifest.json").read_text())      # valid manifest of what finished
    assert m["n_rows"] == 2 and not m["complete"] and m["n_missing"] == 4
    # what a killed writer may leave: a temporary file and an output of an unfinished row
    (out / "images" / ".case1_aug000.nii.gz.part-999999999.nii.gz").write_bytes(b"half")
    (out / "images" / "case1_aug000.nii.gz").write_bytes(b"truncated")
    with pytest.raises(FileExistsError, match="not empty"):
        run_export(folder2d, out, opts)
    with pytest.raises(FileExistsError, match="different settings"):
        run_export(folder2d, out, _opts(per_image=3, weights=ckpts["2d"], seed=5, resume=True))
    summary = run_export(folder2d, out, _opts(per_image=3, weights=ckpts["2d"], inverse=True, resume=True))
    assert summary["complete"] and summary["written"] == 4 and summary["previously_done"] == 2
    m = json.loads((out / "manifest.json").read_text())
    ids = [r["row_id"] for r in m["rows"]]
    assert len(ids) == len(set(ids)) == 6
    assert all(verify_row(out, r) for r in m["rows"])
    assert not list(out.rglob("*.part-*"))
    for p in out.rglob("*.nii.gz"):
        nib.load(str(p)).get_fdata()                              # every file is complete
    # nothing left to do
    assert run_export(folder2d, out, _opts(per_image=3, weights=ckpts["2d"], inverse=True, resume=True))["written"] == 0


def test_resume_refuses_a_different_fold_guard(tmp_path, folder2d, ckpts):
    """Outputs made with and without the fold guard never end up in one folder; a run.json from a
    version that did not record the guard counts as guard off."""
    out = tmp_path / "out"
    hook = _interrupt_after(1)
    with pytest.raises(KeyboardInterrupt):
        run_export(folder2d, out, _opts(weights=ckpts["2d"]), progress=hook)
    with pytest.raises(FileExistsError, match="fold_guard"):
        run_export(folder2d, out, _opts(weights=ckpts["2d"], fold_guard=True, resume=True))
    run_file = out / "run.json"
    rec = json.loads(run_file.read_text())
    assert rec["fold_guard"] is False
    del rec["fold_guard"]
    run_file.write_text(json.dumps(rec))
    summary = run_export(folder2d, out, _opts(weights=ckpts["2d"], resume=True))
    assert summary["complete"] and summary["previously_done"] == 1


def test_resume_after_a_torn_journal_line(tmp_path, folder2d, ckpts):
    """A writer killed in the middle of a journal line leaves half a record without a newline:
    reading skips it, --resume redoes that row and the journal holds only whole records after."""
    out = tmp_path / "out"
    hook = _interrupt_after(3)
    with pytest.raises(KeyboardInterrupt):
        run_export(folder2d, out, _opts(weights=ckpts["2d"]), progress=hook)
    journal = out / "journal-0-of-1.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    rows = [i for i, ln in enumerate(lines) if '"type": "row"' in ln]
    assert len(rows) == 3
    torn = lines[rows[-1]]
    journal.write_text("".join(lines[: rows[-1]] + lines[rows[-1] + 1:]) + torn[: len(torn) // 2])
    assert len(load_manifest(out)["rows"]) == 2                    # the torn record does not count
    summary = run_export(folder2d, out, _opts(weights=ckpts["2d"], resume=True))
    assert summary["complete"] and summary["previously_done"] == 2 and summary["written"] == 2
    for ln in journal.read_text().splitlines():
        json.loads(ln)                                              # every line whole again
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(r["row_id"] for r in m["rows"]) == sorted(set(r["row_id"] for r in m["rows"]))
    assert m["n_rows"] == 4 and all(verify_row(out, r) for r in m["rows"])


def test_ctrl_c_on_the_command_line(tmp_path, folder2d, ckpts):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "napari_drdm.cli", "augment", str(folder2d), str(out), "-n", "400", "--t-prime", "2",
           "--schedule", "paper", "--weights", ckpts["2d"], "--batch", "1", "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = out / "journal-0-of-1.jsonl"
    t0 = time.time()
    rows = 0
    while time.time() - t0 < 600 and proc.poll() is None:  # generous: a busy 2-core machine is slow
        rows = journal.read_text().count('"type": "row"') if journal.exists() else 0
        if rows >= 2:
            break
        time.sleep(0.1)
    if rows < 2:
        proc.kill()
        out_, err_ = proc.communicate(timeout=60)
        when = "exiting" if proc.returncode is not None else "the wait ended"
        pytest.fail(f"the export wrote {rows} rows before {when}: {err_[-2000:]}")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "--resume" in err
    m = json.loads((out / "manifest.json").read_text())
    assert 2 <= m["n_rows"] < 800 and all(verify_row(out, r) for r in m["rows"])


def test_a_swallowed_interrupt_still_stops_the_export(tmp_path, folder2d, ckpts, monkeypatch, capsys):
    """Ctrl-C that lands in a finalizer raises a KeyboardInterrupt Python only prints (seen in CI:
    nibabel's ``OrderedSet.__del__``); the signal is remembered, so the export stops at its next batch
    as if the exception had arrived: exit 130, the resume hint, every finished row verified."""
    from napari_drdm import cli
    from napari_drdm.export import engine
    real, calls = engine.compute_batch, []

    def compute(members, opts):
        calls.append(1)
        if len(calls) == 2:
            cli._STOP["how"] = "interrupted"       # what cli._on_sigint records before its exception is lost
        return real(members, opts)
    monkeypatch.setattr(engine, "compute_batch", compute)
    out = tmp_path / "out"
    code = main(["augment", str(folder2d), str(out), "-n", "20", "--t-prime", "2", "--schedule", "paper",
                 "--weights", ckpts["2d"], "--batch", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted after 2 new outputs" in err and "--resume" in err, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["n_rows"] == 2 and all(verify_row(out, r) for r in m["rows"])
    assert cli.stop_requested() == "interrupted"
    monkeypatch.setattr(engine, "compute_batch", real)
    assert main(["augment", str(folder2d), str(out), "-n", "20", "--t-prime", "2", "--schedule", "paper",
                 "--weights", ckpts["2d"], "--batch", "1", "--no-progress", "--resume"]) == 0   # a new run: no stop
    assert cli.stop_requested() is None


def test_compose_padding_is_used_recorded_and_reproduced(tmp_path, folder2d, ckpts, capsys):
    """--compose-padding reaches the reverse loop (other fields than the model's own padding),
    every manifest row and the run's settings record the padding used, a row is regenerated with
    it, and --resume refuses another padding."""
    base = ["augment", str(folder2d), "-n", "1", "--t-prime", "2", "--schedule", "paper", "--weights", ckpts["2d"],
            "--batch", "1", "--no-progress"]
    own, border = tmp_path / "own", tmp_path / "border"
    assert main(base[:2] + [str(own)] + base[2:]) == 0
    assert main(base[:2] + [str(border)] + base[2:] + ["--compose-padding", "border"]) == 0
    a, b = load_manifest(own), load_manifest(border)
    assert {r["compose_padding"] for r in a["rows"]} == {"zeros"}          # the tiny 2D model's own
    assert {r["compose_padding"] for r in b["rows"]} == {"border"}
    assert b["run"]["compose_padding"] == "border" and a["run"]["compose_padding"] is None
    assert "compose_padding" in (border / "manifest.csv").read_text().splitlines()[0].split(",")
    rows_a, rows_b = ({r["row_id"]: r for r in m["rows"]} for m in (a, b))
    assert any(rows_a[k]["ddf_sha256"] != rows_b[k]["ddf_sha256"] for k in rows_a)
    res = reproduce_row(border / "manifest.json", "case0_aug000", tmp_path / "again")
    assert res["identical"] and all(res["identical"].values()), res
    capsys.readouterr()
    assert main(base[:2] + [str(border)] + base[2:] + ["--compose-padding", "zeros", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "different settings (compose_padding)" in err
    with pytest.raises(InputError, match="--compose-padding: expected border or zeros"):
        _opts(compose_padding="reflection").validate()


def test_rows_record_their_environment_and_a_differing_reproduction_names_it(tmp_path, folder2d, ckpts, capsys):
    """Every row records the torch version and the CPU kernels' instruction set beside the device and
    threads; when a reproduction differs, --reproduce names what differs from the row's environment."""
    import json

    import torch
    out = tmp_path / "out"
    assert main(["augment", str(folder2d), str(out), "-n", "1", "--t-prime", "2", "--schedule", "paper",
                 "--weights", ckpts["2d"], "--batch", "1", "--no-progress"]) == 0
    m = load_manifest(out)
    row = m["rows"][0]
    assert row["torch"] == torch.__version__ and row["device"] == "cpu"
    assert row["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    header = (out / "manifest.csv").read_text().splitlines()[0].split(",")
    assert header.index("threads") < header.index("torch") < header.index("cpu_capability") < header.index("batch_id")
    res = reproduce_row(out / "manifest.json", row["row_id"], tmp_path / "same")
    assert all(res["identical"].values()) and res["environment"] == {}
    # a manifest written elsewhere: another instruction set, and an image that came out different there
    mj = json.loads((out / "manifest.json").read_text())
    mj["rows"][0].update(cpu_capability="ELSEWHERE", image_sha256="0" * 64)
    (out / "manifest.json").write_text(json.dumps(mj))
    capsys.readouterr()
    assert main(["augment", "--reproduce", str(out / "manifest.json"), row["row_id"], str(tmp_path / "other")]) == 1
    printed = capsys.readouterr().out
    assert "image:" in printed and "DIFFERS" in printed
    assert f"written with cpu_capability ELSEWHERE; reproduced with cpu_capability {row['cpu_capability']}" in printed
    # rows written before the keys were recorded are silent on them
    from napari_drdm.export.environment import environment_differences, run_environment
    now = run_environment("cpu")
    assert environment_differences({"device": "cpu", "threads": now["threads"]}, now) == {}
    assert environment_differences({"threads": now["threads"] + 1, "torch": None}, now) == {
        "threads": (now["threads"] + 1, now["threads"])}


def test_bad_inputs_are_reported_and_skipped(tmp_path, folder2d, ckpts, capsys):
    (folder2d / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    img, _ = _phantom((40, 36))
    _save(folder2d / "mism.nii.gz", img, AFF2)
    _save(folder2d / "mism_label.nii.gz", np.zeros((20, 20), np.uint8), AFF2)
    _save(folder2d / "fourd.nii.gz", np.zeros((8, 8, 8, 3), np.float32), AFF2)
    (folder2d / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    rc = main(["augment", str(folder2d), str(out), "-n", "1", "--t-prime", "1", "--schedule", "paper",
               "--weights", ckpts["2d"], "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0
    for name, why in (("broken.nii.gz", "unreadable"), ("mism_label.nii.gz", "does not match"),
                      ("fourd.nii.gz", "4D"), ("notes.txt", "unsupported")):
        assert name in err and why in err, (name, err)
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(r["name"] for r in m["rows"]) == ["case0", "case1"] and m["complete"]
    assert len(m["skipped"]) == 4
    with pytest.raises(InputError, match="broken.nii.gz"):
        run_export(folder2d, tmp_path / "strict", _opts(per_image=1, weights=ckpts["2d"], strict=True))


def test_full_disk_stops_with_valid_manifest(tmp_path, folder2d, ckpts, monkeypatch, capsys):
    out = tmp_path / "out"
    real = nib.save
    calls = [0]

    def save(img, path):
        calls[0] += 1
        if calls[0] == 7:              # mid-way through the 3rd output
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(img, path)

    monkeypatch.setattr(nib, "save", save)
    args = ["augment", str(folder2d), str(out), "-n", "2", "--t-prime", "1", "--schedule", "paper",
            "--weights", ckpts["2d"], "--no-progress", "--batch", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "disk full while writing" in err and "--resume" in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["n_rows"] == 2 and all(verify_row(out, r) for r in m["rows"])
    assert not list(out.rglob("*.part-*"))
    monkeypatch.setattr(nib, "save", real)
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_shards_merge_and_batch_one_is_batch_independent(tmp_path, folder2d, ckpts):
    one = tmp_path / "one"
    run_export(folder2d, one, _opts(weights=ckpts["2d"], batch=1))
    shards = tmp_path / "sharded"
    for i in range(2):
        s = run_export(folder2d, shards, _opts(weights=ckpts["2d"], batch=1, shard=(i, 2)))
    assert s["complete"]
    a = {r["row_id"]: r for r in load_manifest(one)["rows"]}
    b = {r["row_id"]: r for r in load_manifest(shards / "manifest.json")["rows"]}
    assert set(a) == set(b) and len(a) == 4
    assert all(a[k]["image_sha256"] == b[k]["image_sha256"] and a[k]["ddf_sha256"] == b[k]["ddf_sha256"] for k in a)


def test_overwrite_starts_afresh(tmp_path, folder2d, ckpts):
    out = tmp_path / "out"
    run_export(folder2d, out, _opts(weights=ckpts["2d"], per_image=2))
    s = run_export(folder2d, out, _opts(weights=ckpts["2d"], per_image=1, t_prime="2", overwrite=True))
    m = load_manifest(out / "manifest.json")
    assert s["complete"] and sorted(r["row_id"] for r in m["rows"]) == ["case0_aug000", "case1_aug000"]
    assert all(r["t_prime"] == 2 and verify_row(out, r) for r in m["rows"])


def test_layer_inputs_are_saved_and_reproducible(tmp_path, ckpts):
    from napari_drdm.export import ArrayInput
    img, lab = _phantom((36, 32))
    out = tmp_path / "out"
    s = run_export([ArrayInput("my layer", img.astype(np.float32), lab, AFF2)], out, _opts(weights=ckpts["2d"]))
    assert s["complete"] and (out / "sources" / "my_layer.nii.gz").exists()
    moved = tmp_path / "moved"
    out.rename(moved)                                   # reproducible even after moving the folder
    res = reproduce_row(moved, "my_layer_aug001", tmp_path / "again")
    assert all(res["identical"].values())



def test_layer_inputs_with_a_relative_output_folder(tmp_path, ckpts, monkeypatch):
    """A relative OUT must not be applied twice (OUT/sources/OUT/sources/...) when layers are saved."""
    from napari_drdm.export import ArrayInput
    img, lab = _phantom((36, 32))
    monkeypatch.chdir(tmp_path)
    s = run_export([ArrayInput("a", img.astype(np.float32), lab, AFF2)], Path("rel") / "out",
                   _opts(weights=ckpts["2d"], per_image=1))
    assert s["complete"] and s["written"] == 1
    assert (tmp_path / "rel" / "out" / "sources" / "a.nii.gz").exists()
    assert not (tmp_path / "rel" / "out" / "sources" / "rel").exists()


# ------------------------------------------------------------------------------------ Algorithm 4
def test_synthesize_pairs_consistent(tmp_path, ckpts):
    from napari_drdm.core.spatial import warp
    d = tmp_path / "smooth"
    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir()
    for k, shape in enumerate([(40, 36), (30, 44)]):
        img, lab = _phantom(shape, k, noise=0)
        _save(d / "images" / f"case{k}.nii.gz", img.astype(np.float32), AFF2)
        _save(d / "labels" / f"case{k}.nii.gz", lab, AFF2)
    out = tmp_path / "pairs"
    rc = main(["synthesize-pairs", str(d), str(out), "-n", "2", "--t-prime-aug", "10", "--t-prime-syn", "10",
               "--schedule", "paper", "--weights", ckpts["smooth2d"], "--no-progress"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["n_rows"] == 4
    row = m["rows"][0]
    assert {"t_prime_aug", "t_prime_syn", "seed_aug", "seed_syn", "moving", "fixed", "ddf", "moving_labels",
            "fixed_labels"} <= set(row)
    for r in m["rows"]:
        src = nib.load(r["source"])
        mv, fx, ddf = (nib.load(str(out / r[k])) for k in ("moving", "fixed", "ddf"))
        for x in (mv, fx, ddf):
            np.testing.assert_allclose(x.affine, src.affine)
        assert mv.shape == fx.shape == src.shape
        u = nifti_array_to_ddf(np.asanyarray(ddf.dataobj), src.header.get_zooms())
        mvf = torch.as_tensor(np.asanyarray(mv.dataobj).astype(np.float32))[None, None]
        pred = warp(mvf, torch.as_tensor(u)[None], "linear", "border")[0, 0].numpy()
        fxa = np.asanyarray(fx.dataobj).astype(np.float32)
        rng = float(fxa.max() - fxa.min())
        inner = (slice(4, -4), slice(4, -4))
        # fixed(x) = I0(x + phi(x)) with phi = compose(phi_syn, phi_aug) ~ moving(x + phi_syn(x))
        err = np.abs(pred - fxa)[inner]
        assert np.median(err) < 0.02 * rng, np.median(err) / rng
        assert np.abs(u).max() > 0.5                               # a real deformation, not the identity
        assert np.median(err) < 0.2 * np.median(np.abs(fxa - np.asanyarray(mv.dataobj))[inner])
        labs = np.unique(np.asanyarray(nib.load(str(out / r["fixed_labels"])).dataobj))
        assert set(labs) <= {0, 2, 5}
    res = reproduce_row(out, m["rows"][-1]["row_id"], tmp_path / "again")
    assert all(res["identical"].values())


# ------------------------------------------------------------------------------------ inverse field
def test_inverse_field_residual_small():
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(40.0), indexing="ij")
    u = torch.stack([2.0 * torch.sin(xx / 40 * 2 * np.pi), 1.5 * torch.cos(yy / 48 * 2 * np.pi)])[None]
    v, res = invert_field(u, (0.5, 2.0))
    assert res["inverse_residual_max_px"] < 0.05 and res["inverse_residual_max_mm"] < 0.1
    from napari_drdm.core.spatial import warp
    img = torch.exp(-((yy - 24) ** 2 + (xx - 20) ** 2) / 60)[None, None]
    back = warp(warp(img, u), v)                      # warping by u, then by v, gives the image back
    assert float((back - img)[..., 4:-4, 4:-4].abs().max()) < 0.02


def test_inverse_in_manifest(tmp_path, folder2d, ckpts):
    out = tmp_path / "out"
    run_export(folder2d, out, _opts(weights=ckpts["smooth2d"], t_prime="10", inverse=True, per_image=1))
    rows = load_manifest(out)["rows"]
    assert all(r["inverse_residual_max_mm"] < 0.5 and (out / r["inverse_ddf"]).exists() for r in rows)


# ------------------------------------------------------------------------------------ on the fly
def test_dict_transform(ckpts):
    from napari_drdm.core.spatial import warp_labels
    from napari_drdm.transforms import DRDMTransform
    img, lab = _phantom((36, 32))
    data = {"image": img[None].astype(np.float32), "label": lab[None], "meta": "kept"}
    t = DRDMTransform(ckpts["smooth2d"], t_prime="2:3", schedule="paper", ddf_key="ddf", seed=1)
    out = t(data)
    assert out["meta"] == "kept" and out["image"].shape == (1, 36, 32) and out["label"].dtype == np.uint8
    assert set(np.unique(out["label"])) <= {0, 2, 5} and out["ddf"].shape == (2, 36, 32)
    assert not np.array_equal(out["image"], data["image"])
    # image and labels moved by the same field
    again = warp_labels(torch.as_tensor(lab.astype(np.int64))[None, None], torch.as_tensor(out["ddf"])[None])
    np.testing.assert_array_equal(again[0, 0].numpy(), out["label"][0])
    t2 = DRDMTransform(ckpts["smooth2d"], t_prime="2:3", schedule="paper", ddf_key="ddf", seed=1)
    np.testing.assert_array_equal(t2(data)["image"], out["image"])           # seeded: repeatable
    ten = t(torch.as_tensor(data["image"]))                                  # array in, same type out
    assert isinstance(ten, torch.Tensor) and ten.shape == (1, 36, 32)
    assert t({"image": data["image"], "label": data["label"]}) is not None
    with pytest.raises(KeyError, match="label"):
        t({"image": data["image"]})
    # the composition padding reaches the generation (the 2D random model's own is zeros)
    tb, tz = (DRDMTransform(ckpts["2d"], label_keys=(), t_prime="2", schedule="paper", ddf_key="ddf", seed=1,
                            compose_padding=p) for p in ("border", None))
    assert not np.array_equal(tb(data)["ddf"], tz(data)["ddf"])
    with pytest.raises(InputError, match="^compose_padding: expected border or zeros, got 'edge'$"):
        DRDMTransform(ckpts["2d"], compose_padding="edge")


class _Deformed(torch.utils.data.Dataset):
    """The same tiny image, deformed afresh on every access; each item says which worker made it."""

    def __init__(self, transform, image, n):
        self.transform, self.image, self.n = transform, image, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return self.transform({"image": self.image})["ddf"], -1 if info is None else info.id


def test_dict_transform_reseeds_each_dataloader_worker(ckpts):
    """A seeded transform in a DataLoader with two worker processes: each (forked) worker draws its
    own deformations instead of repeating its twin's, and the whole epoch is repeatable."""
    from torch.utils.data import DataLoader

    from napari_drdm.transforms import DRDMTransform
    img = _phantom((20, 18))[0][None].astype(np.float32)

    def epoch():
        t = DRDMTransform(ckpts["smooth2d"], label_keys=(), t_prime="1:3", schedule="paper", ddf_key="ddf", seed=7)
        loader = DataLoader(_Deformed(t, img, 4), batch_size=None, num_workers=2)
        return [(np.asarray(ddf), int(w)) for ddf, w in loader]

    first = epoch()
    assert [w for _, w in first] == [0, 1, 0, 1]              # round robin over the two workers
    by_worker = {w: [d for d, ww in first if ww == w] for w in (0, 1)}
    for k in range(2):                                        # the twins differ at every draw
        assert not np.array_equal(by_worker[0][k], by_worker[1][k])
    assert not np.array_equal(by_worker[0][0], by_worker[0][1])   # and each worker's draws differ
    for (d1, w1), (d2, w2) in zip(first, epoch()):            # seeded: the same epoch again
        assert w1 == w2
        np.testing.assert_array_equal(d1, d2)


def test_missing_default_weights_message(tmp_path, folder2d, monkeypatch):
    monkeypatch.setattr(export_sample, "DEFAULT_WEIGHTS", {2: "no_such_model", 3: "no_such_model"})
    with pytest.raises(LookupError, match="no --weights given.*no_such_model"):
        run_export(folder2d, tmp_path / "o", _opts())


@pytest.mark.slow
def test_torchrun_two_ranks_one_manifest(tmp_path, folder2d, ckpts):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    out = tmp_path / "out"
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", "29581", "-m", "napari_drdm.cli", "augment",
           str(folder2d), str(out), "-n", "2", "--t-prime", "1", "--schedule", "paper", "--weights", ckpts["2d"],
           "--threads", "1", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.glob("journal-*")) == ["journal-0-of-2.jsonl", "journal-1-of-2.jsonl"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["n_rows"] == 4 and all(verify_row(out, r) for r in m["rows"])


def test_load_sample_is_a_typed_record(folder2d, ckpts):
    from napari_drdm.export import LoadedSample, ModelProvider, discover, load_sample
    samples, skipped = discover(folder2d)
    assert not skipped and [s.name for s in samples] == ["case0", "case1"]
    ls = load_sample(samples[0], ModelProvider(ckpts["2d"], "cpu"))
    assert isinstance(ls, LoadedSample) and ls.sample is samples[0]
    assert ls.image.shape == (40, 36) and ls.labels.shape == ls.image.shape
    assert tuple(ls.x.shape) == (1, 1, 40, 36) and tuple(ls.lab_t.shape) == (1, 1, 40, 36)
    assert ls.model.ndim == 2 and tuple(ls.x_model.shape) == (1, 1, 32, 32)
    assert set(ls.label_values.tolist()) == set(np.unique(ls.labels).tolist()) and ls.background == 0
    assert ls.lo <= ls.hi and len(ls.source_sha256) == 64 and len(ls.labels_source_sha256) == 64
    no_sha = load_sample(samples[0], ModelProvider(ckpts["2d"], "cpu"), with_sha=False)
    assert no_sha.source_sha256 is None and no_sha.labels_source_sha256 is None
