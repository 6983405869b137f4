r"""The paper's tables from our runs: every metrics.json under a folder, the paper's number beside.

    runs = find_runs("/tmp/sweep")          # [(path, metrics dict)]
    cells = gather(runs)                    # {table key: {(row, column): Cell}}
    print(markdown(cells))
    write_csv(cells, "tables.csv"); plot(cells, "tables.png")

A run is placed by its metrics.json's `config` (task, data.distortion, model.name, ...): MNIST
runs in Table 1 (distortions R, RTS, P, E) or the TC line, SVHN runs (config.task == "svhn") in
Table 2, CUB runs ("cub") in Table 3. A cell holds the mean and sample std of its seeds and
their count; its runs must share every config field but the seed (when they do not, the largest
group is shown and the others counted as ignored). Cells are marked when missing, when run at
`runlocal` size, and when trained on a data source that is not the paper's.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any

# --- The paper's numbers (Jaderberg et al., "Spatial Transformer Networks", NIPS 2015) ----------
# Table 1 (% test error, distorted MNIST), Sect. 4.1's text for TC (% error), Table 2 (% sequence
# error, SVHN) and Table 3 (% accuracy, CUB-200-2011), copied from the paper.

TABLE1_ROWS = ("FCN", "CNN", "ST-FCN Aff", "ST-FCN Proj", "ST-FCN TPS", "ST-CNN Aff",
               "ST-CNN Proj", "ST-CNN TPS")
PAPER_TABLE1 = {  # row: (R, RTS, P, E)
    "FCN": (2.1, 5.2, 3.1, 3.2),
    "CNN": (1.2, 0.8, 1.5, 1.4),
    "ST-FCN Aff": (1.2, 0.8, 1.5, 2.7),
    "ST-FCN Proj": (1.3, 0.9, 1.4, 2.6),
    "ST-FCN TPS": (1.1, 0.8, 1.4, 2.4),
    "ST-CNN Aff": (0.7, 0.5, 0.8, 1.2),
    "ST-CNN Proj": (0.8, 0.6, 0.8, 1.3),
    "ST-CNN TPS": (0.7, 0.5, 0.8, 1.1),
}
# The text names no transform for TC's ST models; they are shown beside our affine ones.
PAPER_TC = {"FCN": 13.2, "CNN": 3.5, "ST-FCN Aff": 2.0, "ST-CNN Aff": 1.7}
PAPER_TABLE2 = {("CNN", "64px"): 4.0, ("CNN", "128px"): 5.6,
                ("ST-CNN Single", "64px"): 3.7, ("ST-CNN Single", "128px"): 3.9,
                ("ST-CNN Multi", "64px"): 3.6, ("ST-CNN Multi", "128px"): 3.9}
PAPER_TABLE3 = {("CNN", "224px"): 82.3, ("2xST-CNN", "224px"): 83.1,
                ("2xST-CNN", "448px"): 83.9, ("4xST-CNN", "448px"): 84.1}


@dataclasses.dataclass(frozen=True)
class TableSpec:
    key: str
    title: str
    metric: str  # What the numbers are.
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    paper: dict[tuple[str, str], float]


TABLES = {
    "table1": TableSpec("table1", "Table 1: distorted MNIST", "test error (%)", TABLE1_ROWS,
                        ("R", "RTS", "P", "E"),
                        {(row, col): PAPER_TABLE1[row][i] for row in TABLE1_ROWS
                         for i, col in enumerate(("R", "RTS", "P", "E"))}),
    "tc": TableSpec("tc", "TC line (Sect. 4.1 text): translated, cluttered MNIST",
                    "test error (%)", TABLE1_ROWS, ("TC",),
                    {(row, "TC"): value for row, value in PAPER_TC.items()}),
    "table2": TableSpec("table2", "Table 2: SVHN multi-digit", "sequence error (%)",
                        ("CNN", "ST-CNN Single", "ST-CNN Multi"), ("64px", "128px"), PAPER_TABLE2),
    "table3": TableSpec("table3", "Table 3: CUB-200-2011", "accuracy (%)",
                        ("CNN", "2xST-CNN", "4xST-CNN"), ("224px", "448px"), PAPER_TABLE3),
}

# Sources that are not the paper's data: the digits bundled with the package (4,000 of MNIST's
# training digits, tested on 1,000 others), house-number-like sequences built from MNIST, and
# generated stand-ins. Any other source (tfds, idx, the official files) counts as the paper's.
NON_PAPER_SOURCES = frozenset({"bundled", "mnist_sequences", "synthetic", "fake", "random"})
_MNIST_ROWS = {"fcn": "FCN", "cnn": "CNN", "st_fcn": "ST-FCN", "st_cnn": "ST-CNN"}
_TRANSFORMS = {"affine": "Aff", "projective": "Proj", "tps": "TPS"}
_SVHN_ROWS = {"cnn": "CNN", "st_single": "ST-CNN Single", "st_multi": "ST-CNN Multi"}


def _get(tree: dict, *paths: str, default: Any = None) -> Any:
    """The value at the first dotted path present in the nested dict `tree`."""
    for path in paths:
        node = tree
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return node
    return default


def place(metrics: dict) -> tuple[str, str, str, float] | None:
    """(table key, row, column, value) of one run's metrics.json, or None if it has no place.

    The value is the test error (%), or for Table 3 the accuracy, 100 - test_error_pct.

    Example:
        >>> place({"test_error_pct": 6.3, "config": {"task": "mnist", "data": {"distortion":
        ...        "RTS"}, "model": {"name": "st_cnn", "transform": "tps"}}})
        ('table1', 'ST-CNN TPS', 'RTS', 6.3)
    """
    config, error = metrics.get("config", {}), metrics.get("test_error_pct")
    if not isinstance(error, (int, float)) or not math.isfinite(error):
        return None
    task = metrics.get("task") or config.get("task", "mnist")  # None: written before tasks.
    if task == "mnist":
        distortion, name = _get(config, "data.distortion"), _get(config, "model.name")
        if name not in _MNIST_ROWS:
            return None
        row = _MNIST_ROWS[name]
        if name.startswith("st_"):
            row += " " + _TRANSFORMS.get(_get(config, "model.transform"), "?")
        if distortion == "TC":
            return "tc", row, "TC", error
        return ("table1", row, distortion, error) if distortion in ("R", "RTS", "P", "E") else None
    size = _get(config, "data.size", "data.image_size", "data.crop_size", "model.size", "size")
    if task == "svhn":
        row = _SVHN_ROWS.get(_get(config, "model.name", "model.kind"))
        return ("table2", row, f"{size}px", error) if row and size in (64, 128) else None
    if task == "cub":
        num_st = _get(config, "model.num_st", "model.num_transformers", "num_st")
        row = {0: "CNN", 2: "2xST-CNN", 4: "4xST-CNN"}.get(num_st)
        return ("table3", row, f"{size}px", 100.0 - error) if row and size in (224, 448) else None
    return None


def find_runs(workdir: str) -> list[tuple[str, dict]]:
    """Every readable metrics.json under `workdir` (sorted by path) and its contents; one cut
    short (still being written) or not a JSON object is left out."""
    runs = []
    for folder, subfolders, files in os.walk(workdir):
        subfolders.sort()
        if "metrics.json" in files:
            path = os.path.join(folder, "metrics.json")
            try:
                with open(path) as f:
                    metrics = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(metrics, dict):
                runs.append((path, metrics))
    return sorted(runs, key=lambda run: run[0])


@dataclasses.dataclass
class Cell:
    """One cell: the paper's number and ours over seeds."""

    paper: float | None
    values: list[float]
    runlocal: bool = False  # Any of the runs at runlocal size.
    sources: tuple[str, ...] = ()  # Data sources of the runs.
    ignored: int = 0  # Runs with other settings, left out.
    paths: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1); None below two seeds."""
        if self.n < 2:
            return None
        mean = self.mean
        return math.sqrt(sum((v - mean) ** 2 for v in self.values) / (self.n - 1))

    @property
    def non_paper_data(self) -> bool:
        return any(source in NON_PAPER_SOURCES for source in self.sources)


def _settings(metrics: dict) -> str:
    """The run's config without its seed: runs with equal settings are seeds of one cell."""
    config = dict(metrics.get("config", {}))
    config.pop("seed", None)
    return json.dumps(config, sort_keys=True, default=repr)


def gather(runs: list[tuple[str, dict]]) -> dict[str, dict[tuple[str, str], Cell]]:
    """{table key: {(row, column): Cell}} with every cell of every table (paper or ours)."""
    grouped: dict[tuple[str, str, str], dict[str, list]] = {}
    for path, metrics in runs:
        placed = place(metrics)
        if placed is None:
            continue
        table, row, column, value = placed
        grouped.setdefault((table, row, column), {}).setdefault(_settings(metrics), []).append(
            (path, metrics, value))
    cells = {}
    for key, spec in TABLES.items():
        cells[key] = {(row, column): Cell(paper=spec.paper.get((row, column)), values=[])
                      for row in spec.rows for column in spec.columns}
    for (table, row, column), groups in grouped.items():
        # The group with the most seeds (then the most steps) is the cell; the rest are counted.
        best = max(groups.values(), key=lambda g: (len(g), max(m.get("steps", 0) for _, m, _ in g)))
        cells[table][(row, column)] = Cell(
            paper=TABLES[table].paper.get((row, column)),
            values=[value for _, _, value in best],
            runlocal=any(bool(_get(m.get("config", {}), "runlocal", default=False))
                         for _, m, _ in best),
            sources=tuple(sorted({str(m.get("data_source", "?")) for _, m, _ in best})),
            ignored=sum(len(g) for g in groups.values()) - len(best),
            paths=tuple(path for path, _, _ in best))
    return cells


RUNLOCAL_MARK, DATA_MARK, IGNORED_MARK = "†", "‡", "*"


def _nice_step(top: float) -> float:
    """A tick step of 1, 2 or 5 times a power of ten giving at most 6 ticks up to `top`."""
    power = 10.0 ** math.floor(math.log10(top / 5))
    return next(m * power for m in (1, 2, 5, 10) if top / (m * power) <= 5)


def format_ours(cell: Cell, *, ascii_marks: bool = False) -> str:
    """'6.30 ± 0.41 (n=3) †‡', or 'not run'.

    Example:
        >>> format_ours(Cell(paper=0.5, values=[6.0, 7.0], runlocal=True, sources=("bundled",)))
        '6.50 ± 0.71 (n=2) †‡'
    """
    if not cell.values:
        return "not run"
    text = f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "")
    if ascii_marks:  # For the plot: its font has no dagger.
        words = (["runlocal"] if cell.runlocal else []) + [
            s for s in cell.sources if s in NON_PAPER_SOURCES] + (
            [f"{cell.ignored} left out"] if cell.ignored else [])
        return f"{text} (n={cell.n})" + (f" [{', '.join(words)}]" if words else "")
    marks = ((RUNLOCAL_MARK if cell.runlocal else "") + (DATA_MARK if cell.non_paper_data else "")
             + (IGNORED_MARK if cell.ignored else ""))
    return f"{text} (n={cell.n})" + (f" {marks}" if marks else "")


def _has_runs(table: dict[tuple[str, str], Cell]) -> bool:
    return any(cell.values for cell in table.values())


def markdown(cells: dict[str, dict[tuple[str, str], Cell]], *, workdir: str = "") -> str:
    """The tables with runs, in markdown: each cell 'ours / paper'; a legend; tables without runs
    listed at the end."""
    out, empty, sources = [], [], set()
    for key, spec in TABLES.items():
        table = cells[key]
        if not _has_runs(table):
            empty.append(spec.title)
            continue
        rows = [row for row in spec.rows
                if any(table[(row, c)].values or table[(row, c)].paper is not None
                       for c in spec.columns)]
        out += [f"### {spec.title}, {spec.metric}", "",
                "| model | " + " | ".join(spec.columns) + " |",
                "|---|" + "---|" * len(spec.columns)]
        for row in rows:
            texts = []
            for column in spec.columns:
                cell = table[(row, column)]
                sources.update(cell.sources)
                paper = "-" if cell.paper is None else f"{cell.paper:g}"
                texts.append(f"{format_ours(cell)} / {paper}")
            out.append(f"| {row} | " + " | ".join(texts) + " |")
        out.append("")
    non_paper = sorted(sources & NON_PAPER_SOURCES)
    legend = ("Each cell: ours, mean ± sample std over seeds (n = seeds) / the paper's number "
              "(- where the paper has none). "
              f"{RUNLOCAL_MARK} run at `runlocal` size (a short CPU schedule, not the paper's); "
              f"{DATA_MARK} trained or tested on a data source that is not the paper's"
              + (f" ({', '.join(non_paper)})" if non_paper else "") + "; "
              f"{IGNORED_MARK} runs with other settings under the folder were left out; "
              "not run: no metrics.json for the cell.")
    out.append(legend)
    if empty:
        out += ["", "No runs" + (f" under {workdir}" if workdir else "") + " for: "
                + "; ".join(empty) + "."]
    return "\n".join(out) + "\n"


CSV_FIELDS = ("table", "row", "column", "metric", "paper", "mean", "std", "n", "runlocal",
              "data_sources", "non_paper_data", "ignored_runs", "values")


def write_csv(cells: dict[str, dict[tuple[str, str], Cell]], path: str) -> None:
    """One line per cell of every table (missing ones with n = 0)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for key, spec in TABLES.items():
            for (row, column), cell in cells[key].items():
                writer.writerow([
                    key, row, column, spec.metric, "" if cell.paper is None else cell.paper,
                    "" if cell.mean is None else f"{cell.mean:.4f}",
                    "" if cell.std is None else f"{cell.std:.4f}", cell.n, cell.runlocal,
                    " ".join(cell.sources), cell.non_paper_data, cell.ignored,
                    " ".join(f"{v:.4f}" for v in cell.values)])


def plot(cells: dict[str, dict[tuple[str, str], Cell]], path: str) -> bool:
    """A PNG of ours against the paper: per table with runs, a pair of bars for each cell we ran
    (grey: paper, blue: ours, whisker: ± std). Returns False (and writes nothing) without runs."""
    from PIL import Image, ImageDraw, ImageFont  # Only the plot needs PIL.

    panels = []
    for key, spec in TABLES.items():
        items = [(f"{column} {row}", cell) for row in spec.rows for column in spec.columns
                 if (cell := cells[key][(row, column)]).values]
        if items:
            panels.append((spec, items))
    if not panels:
        return False
    font = ImageFont.load_default(size=14)
    label_w, bar_w, bar_h, pad = 190, 520, 11, 14
    height = pad + sum(40 + len(items) * (2 * bar_h + 10) + 30 for _, items in panels)
    image = Image.new("RGB", (label_w + bar_w + 3 * pad + 260, height), "white")
    draw = ImageDraw.Draw(image)
    y = pad
    for spec, items in panels:
        draw.text((pad, y), f"{spec.title}: {spec.metric}  (grey: paper, blue: ours ± std)",
                  fill="black", font=font)
        y += 26
        top = max(max((c.mean or 0) + (c.std or 0), c.paper or 0) for _, c in items) or 1.0
        step = _nice_step(top)
        top = step * math.ceil(top / step)
        scale = bar_w / top
        x0 = label_w + pad
        for label, cell in items:
            draw.text((pad, y + bar_h // 2), label, fill="black", font=font)
            if cell.paper is not None:
                draw.rectangle([x0, y, x0 + cell.paper * scale, y + bar_h - 1], fill=(160, 160, 160))
                draw.text((x0 + cell.paper * scale + 4, y - 2), f"{cell.paper:g}", fill="gray",
                          font=font)
            yo = y + bar_h
            draw.rectangle([x0, yo, x0 + cell.mean * scale, yo + bar_h - 1], fill=(40, 90, 200))
            if cell.std is not None:
                lo, hi = (cell.mean - cell.std) * scale, (cell.mean + cell.std) * scale
                ym = yo + bar_h // 2
                draw.line([x0 + max(lo, 0), ym, x0 + hi, ym], fill="black", width=1)
                draw.line([x0 + hi, yo + 1, x0 + hi, yo + bar_h - 2], fill="black", width=1)
            draw.text((x0 + (cell.mean + (cell.std or 0)) * scale + 4, yo - 2),
                      format_ours(cell, ascii_marks=True), fill=(40, 90, 200), font=font)
            y += 2 * bar_h + 10
        draw.line([x0, y, x0 + bar_w, y], fill="black")
        for tick in range(round(top / step) + 1):
            value = tick * step
            draw.line([x0 + value * scale, y, x0 + value * scale, y + 4], fill="black")
            draw.text((x0 + value * scale - 8, y + 5), f"{value:g}", fill="black", font=font)
        y += 44
    image.save(path)
    return True
