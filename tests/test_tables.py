"""Tests for experiments/tables.py and experiments/tables_lib.py (metrics.json -> paper tables)."""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # experiments/ lives at the repository root.

from experiments import tables_lib  # noqa: E402


def mnist_metrics(error, *, distortion="RTS", model="st_cnn", transform="affine", seed=0,
                  runlocal=True, source="bundled", num_steps=1500):
    return {"test_error_pct": error, "steps": num_steps, "data_source": source,
            "config": {"task": "mnist", "seed": seed, "runlocal": runlocal,
                       "data": {"distortion": distortion},
                       "model": {"name": model, "transform": transform},
                       "train": {"num_steps": num_steps}}}


def write_runs(root, runs):
    for i, metrics in enumerate(runs):
        folder = root / f"run{i}" / "nested"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(metrics))


def test_paper_numbers_as_printed():
    table1 = tables_lib.TABLES["table1"].paper
    assert (table1[("FCN", "RTS")], table1[("ST-CNN TPS", "E")], table1[("ST-FCN Proj", "R")]) == (
        5.2, 1.1, 1.3)
    # Row sums of Table 1 by hand from the paper (R + RTS + P + E).
    row_sums = {"FCN": 13.6, "CNN": 4.9, "ST-FCN Aff": 6.2, "ST-FCN Proj": 6.2, "ST-FCN TPS": 5.7,
                "ST-CNN Aff": 3.2, "ST-CNN Proj": 3.5, "ST-CNN TPS": 3.1}
    assert len(table1) == 32
    for row, total in row_sums.items():
        assert sum(table1[(row, c)] for c in ("R", "RTS", "P", "E")) == pytest.approx(total)
    assert tables_lib.TABLES["tc"].paper == {("FCN", "TC"): 13.2, ("CNN", "TC"): 3.5,
                                             ("ST-FCN Aff", "TC"): 2.0, ("ST-CNN Aff", "TC"): 1.7}
    assert tables_lib.TABLES["table2"].paper[("ST-CNN Multi", "64px")] == 3.6
    assert tables_lib.TABLES["table3"].paper[("4xST-CNN", "448px")] == 84.1


def test_place_every_family():
    assert tables_lib.place(mnist_metrics(2.0, model="fcn")) == ("table1", "FCN", "RTS", 2.0)
    assert tables_lib.place(mnist_metrics(2.0, distortion="TC", transform="projective")) == (
        "tc", "ST-CNN Proj", "TC", 2.0)
    legacy = mnist_metrics(2.0, distortion="E")
    del legacy["config"]["task"]  # metrics.json written before config.task existed.
    assert tables_lib.place(legacy) == ("table1", "ST-CNN Aff", "E", 2.0)
    svhn = {"test_error_pct": 4.25,
            "config": {"task": "svhn", "model": {"name": "st_multi"}, "data": {"size": 128}}}
    assert tables_lib.place(svhn) == ("table2", "ST-CNN Multi", "128px", 4.25)
    cub = {"test_error_pct": 16.5,
           "config": {"task": "cub", "model": {"num_st": 2}, "data": {"image_size": 448}}}
    assert tables_lib.place(cub) == ("table3", "2xST-CNN", "448px", 83.5)  # Accuracy.
    assert tables_lib.place({"test_error_pct": float("nan"), "config": {}}) is None
    assert tables_lib.place({"config": {"task": "svhn"}}) is None


def test_cells_mean_std_marks_and_missing(tmp_path):
    write_runs(tmp_path, [
        mnist_metrics(6.0, seed=0), mnist_metrics(7.0, seed=1), mnist_metrics(8.5, seed=2),
        mnist_metrics(9.5, model="cnn", runlocal=False, source="tfds"),
        # Another setting of the ST-CNN cell: left out, counted.
        mnist_metrics(1.0, seed=0, num_steps=2),
    ])
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "metrics.json").write_text('{"test_error_pct": 1')  # Being written.
    runs = tables_lib.find_runs(str(tmp_path))
    assert len(runs) == 5
    cells = tables_lib.gather(runs)
    st = cells["table1"][("ST-CNN Aff", "RTS")]
    assert st.values == [6.0, 7.0, 8.5] and st.ignored == 1
    assert st.mean == pytest.approx(43 / 6)
    # Sample std by hand: deviations -7/6, -1/6, 8/6 -> (49 + 1 + 64) / 36 / 2.
    assert st.std == pytest.approx(math.sqrt(114 / 72))
    assert tables_lib.format_ours(st) == "7.17 ± 1.26 (n=3) †‡*"
    cnn = cells["table1"][("CNN", "RTS")]
    assert tables_lib.format_ours(cnn) == "9.50 (n=1)"  # Paper size and data: no marks.
    assert tables_lib.format_ours(cells["table1"][("FCN", "R")]) == "not run"

    text = tables_lib.markdown(cells, workdir="W")
    lines = text.splitlines()
    assert lines[0] == "### Table 1: distorted MNIST, test error (%)"
    assert "| CNN | not run / 1.2 | 9.50 (n=1) / 0.8 | not run / 1.5 | not run / 1.4 |" in lines
    assert ("| ST-CNN Aff | not run / 0.7 | 7.17 ± 1.26 (n=3) †‡* / 0.5 | not run / 0.8 | "
            "not run / 1.2 |") in lines
    assert "(bundled)" in text
    assert lines[-1] == ("No runs under W for: TC line (Sect. 4.1 text): translated, cluttered "
                         "MNIST; Table 2: SVHN multi-digit; Table 3: CUB-200-2011.")


def test_csv_and_png(tmp_path):
    write_runs(tmp_path, [mnist_metrics(6.0, seed=0), mnist_metrics(8.0, seed=1),
                          {"test_error_pct": 17.0, "data_source": "tfds",
                           "config": {"task": "cub", "model": {"num_st": 4},
                                      "data": {"size": 448}}}])
    cells = tables_lib.gather(tables_lib.find_runs(str(tmp_path)))
    tables_lib.write_csv(cells, str(tmp_path / "t.csv"))
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 32 + 8 + 6 + 6  # Every cell of every table, run or not.
    st = next(r for r in rows if (r["table"], r["row"], r["column"]) == ("table1", "ST-CNN Aff", "RTS"))
    assert (st["paper"], st["mean"], st["std"], st["n"]) == ("0.5", "7.0000", "1.4142", "2")
    assert (st["runlocal"], st["data_sources"], st["non_paper_data"]) == ("True", "bundled", "True")
    cub = next(r for r in rows if (r["table"], r["row"], r["column"]) == ("table3", "4xST-CNN", "448px"))
    assert (cub["paper"], cub["mean"], cub["non_paper_data"]) == ("84.1", "83.0000", "False")
    missing = next(r for r in rows if (r["table"], r["row"]) == ("table2", "CNN"))
    assert (missing["n"], missing["mean"]) == ("0", "")

    from PIL import Image
    assert tables_lib.plot(cells, str(tmp_path / "t.png"))
    with Image.open(tmp_path / "t.png") as image:
        width, height = image.size
        pixels = image.convert("RGB").load()
        colours = {pixels[x, y] for x in range(0, width, 2) for y in range(0, height, 2)}
    assert (40, 90, 200) in colours and (160, 160, 160) in colours  # Ours and the paper's bars.
    assert not tables_lib.plot(tables_lib.gather([]), str(tmp_path / "none.png"))
    assert not os.path.exists(tmp_path / "none.png")


def test_entry_point_writes_md_csv_png(tmp_path):
    write_runs(tmp_path / "runs", [mnist_metrics(6.0, distortion="TC", model="cnn")])
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "experiments.tables",
                             f"--workdir={tmp_path / 'runs'}", f"--out={out}", "--name=t1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| CNN | 6.00 (n=1) †‡ / 3.5 |" in result.stdout
    assert sorted(os.listdir(out)) == ["t1.csv", "t1.md", "t1.png"]
    assert (out / "t1.md").read_text() in result.stdout


def test_docstring_examples():
    import doctest

    result = doctest.testmod(tables_lib, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
