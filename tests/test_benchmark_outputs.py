"""No benchmark overwrites a record it finds at its output path unless --force is given, and it says
so before measuring anything (benchmarks/_outputs.py)."""
import importlib
import time

import pytest

from benchmarks._outputs import check_outputs, existing_outputs

# each benchmark's smallest command line that writes files, "{p}" standing for the output path
COMMANDS = {
    "background_extension": ["--json", "{p}"],
    "dark_frame": ["--json", "{p}"],
    "explorer_timing": ["--json", "{p}"],
    "fold_guard": ["--json", "{p}"],
    "fold_locations": ["--weights", "none", "--images", "none", "--json", "{p}"],
    "forward_scale": ["--json", "{p}"],
    "gallery": ["--out", "{p}.png", "--json", "{p}"],
    "generalisation_gap": ["--weights", "none", "--prepared", "none", "--json", "{p}"],
    "inflation": ["--json", "{p}"],
    "loop_length": ["--json", "{p}"],
    "peers": ["--json", "{p}"],
    "reverse_trace": ["--json", "{p}"],
    "speed": ["--json", "{p}"],
    "step_calibration": ["--json", "{p}"],
    "weights_table": ["--json", "{p}"],
    "paired": ["a.json", "b.json", "--plot", "{p}"],
    "downstream_seg": ["--out", "{d}"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_benchmark_refuses_to_overwrite_its_record_before_measuring(name, tmp_path, capsys):
    record = tmp_path / "record.json"
    record.write_text("{}")
    (tmp_path / "downstream_seg.json").write_text("{}")      # downstream_seg writes OUT/downstream_seg.*
    argv = [a.format(p=record, d=tmp_path) for a in COMMANDS[name]]
    main = importlib.import_module(f"benchmarks.{name}").main
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "already exists" in err and "--force" in err, err
    assert record.read_text() == "{}" and (tmp_path / "downstream_seg.json").read_text() == "{}"
    assert time.perf_counter() - t0 < 30            # it stops at the arguments (generous: a loaded machine)


def test_replotting_the_few_shot_records_asks_before_replacing_the_merged_files(tmp_path, capsys):
    from benchmarks import downstream_seg as ds
    png = tmp_path / "merged.png"
    png.write_bytes(b"earlier plot")
    with pytest.raises(SystemExit):
        ds.main(["--replot", "a.json", "b.json", "--out", str(png)])
    assert f"{png} already exists" in capsys.readouterr().err and png.read_bytes() == b"earlier plot"
    png.unlink()
    png.with_suffix(".json").write_text("{}")                 # the merged record beside the plot counts too
    with pytest.raises(SystemExit):
        ds.main(["--replot", "a.json", "b.json", "--out", str(png)])
    assert "merged.json already exists" in capsys.readouterr().err


def test_check_outputs_skips_absent_and_unrequested_paths_and_force_allows(tmp_path):
    there, absent = tmp_path / "a.json", tmp_path / "b.json"
    there.write_text("x")
    assert existing_outputs([there, absent, None, "-", ""]) == [there]
    check_outputs(None, False, absent, None, "-")              # nothing taken: no error
    check_outputs(None, True, there)                           # asked to overwrite
    with pytest.raises(FileExistsError, match="a.json already exists"):
        check_outputs(None, False, there, absent)
    (tmp_path / "c.json").write_text("y")
    with pytest.raises(FileExistsError, match="already exist:"):
        check_outputs(None, False, there, tmp_path / "c.json")
