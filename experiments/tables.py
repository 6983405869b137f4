r"""The paper's Tables 1-3 and the TC line, our runs beside the paper's numbers.

  python -m experiments.tables --workdir=DIR
  python -m experiments.tables --workdir=DIR --out=docs/results --name=table1

Reads every metrics.json under DIR (e.g. the workdir of `python -m experiments.sweep`), prints
the tables in markdown and writes `<out>/<name>.md`, `.csv` (one line per cell) and `.png`
(ours against the paper). Each cell: mean ± std over seeds (n) / the paper's number, marked when
run at `runlocal` size or on data that is not the paper's. Library: `experiments/tables_lib.py`.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from experiments import tables_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder searched for metrics.json files.")
_OUT = flags.DEFINE_string("out", None, "Where the files go (default: --workdir).")
_NAME = flags.DEFINE_string("name", "tables", "File name of the outputs, without extension.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not os.path.isdir(_WORKDIR.value):
        raise app.UsageError(f"--workdir {_WORKDIR.value!r} is not a folder")
    runs = tables_lib.find_runs(_WORKDIR.value)
    cells = tables_lib.gather(runs)
    text = tables_lib.markdown(cells, workdir=_WORKDIR.value)
    out = _OUT.value or _WORKDIR.value
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, _NAME.value)
    with open(base + ".md", "w") as f:
        f.write(text)
    tables_lib.write_csv(cells, base + ".csv")
    wrote_png = tables_lib.plot(cells, base + ".png")
    print(text)
    print(f"{len(runs)} metrics.json files; wrote {base}.md, {base}.csv"
          + (f", {base}.png" if wrote_png else " (no plot: no runs)"))


if __name__ == "__main__":
    app.run(main)
