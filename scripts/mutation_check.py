"""Mutation check: plants known plausible core bugs in a copy of the repo and runs the tests.

Each mutation is found by a regular expression over the sources under stn_jax/ (so it still
applies when code moves between files), must match exactly once, and is applied to a fresh
copy of the committed tree (``git archive HEAD``; ``--worktree`` copies the working tree
instead). The tests that target it then run in that copy; a mutation the tests still pass is a
SURVIVOR, a hole in the suite. An unmutated copy runs the same tests first: they must pass.

    python scripts/mutation_check.py            # the tests that target each mutation
    python scripts/mutation_check.py --full     # the whole test file(s) of each mutation
    python scripts/mutation_check.py --only tps_kernel_r4

Exit status: 0 if every mutation is killed, 1 if one survives, 2 if the baseline fails or a
pattern is not found.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

_REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the bug, in words
    pattern: str  # regex over stn_jax/**/*.py; must match exactly once
    replacement: str  # re.sub replacement
    files: tuple[str, ...]  # test files that should kill it
    select: str  # pytest -k expression: the tests aimed at it


MUTATIONS = (
    Mutation(
        name="reflection_parity",
        what="reflection: odd = fmod(flips, 2) == 1 -> flips >= 1 (wrong 2+ spans away)",
        pattern=r"odd\s*=\s*jnp\.fmod\(\s*flips\s*,\s*2(?:\.0)?\s*\)\s*==\s*1(?:\.0)?",
        replacement="odd = flips >= 1",
        files=("tests/test_sampling.py",),
        select="spans_away",
    ),
    Mutation(
        name="separable_check_x_only",
        what="separability check: same_x & same_y -> same_x",
        pattern=r"return\s+same_x\s*&\s*same_y",
        replacement="return same_x",
        files=("tests/test_fast_paths.py",),
        select="separable",
    ),
    Mutation(
        name="separable_check_y_only",
        what="separability check: same_x & same_y -> same_y",
        pattern=r"return\s+same_x\s*&\s*same_y",
        replacement="return same_y",
        files=("tests/test_fast_paths.py",),
        select="separable",
    ),
    Mutation(
        name="tps_kernel_r4",
        what="TPS kernel r^2 log r^2 -> r^4 log r^2",
        pattern=r"(where\(\s*positive\s*,\s*)d2(\s*\*\s*xp\.log\()",
        replacement=r"\1d2 * d2\2",
        files=("tests/test_grids.py",),
        select="tps",
    ),
    Mutation(
        name="tps_kernel_r3",
        what="TPS kernel r^2 log r^2 -> r^3 log r^2",
        pattern=r"(where\(\s*positive\s*,\s*)d2(\s*\*\s*xp\.log\()",
        replacement=r"\1d2 ** 1.5\2",
        files=("tests/test_grids.py",),
        select="tps",
    ),
)


def _copy_repo(dest: pathlib.Path, worktree: bool) -> None:
    if worktree:
        ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache")
        shutil.copytree(_REPO, dest, ignore=ignore)
        return
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=_REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def _apply(root: pathlib.Path, mutation: Mutation) -> str:
    """Applies the mutation in root; returns 'path:line'. Raises LookupError unless it
    matches exactly once over stn_jax/."""
    hits = []
    for path in sorted((root / "stn_jax").rglob("*.py")):
        text = path.read_text()
        for match in re.finditer(mutation.pattern, text):
            hits.append((path, text, match))
    if len(hits) != 1:
        raise LookupError(f"{mutation.name}: pattern matches {len(hits)} times, not once")
    path, text, match = hits[0]
    mutated = text[: match.start()] + match.expand(mutation.replacement) + text[match.end():]
    path.write_text(mutated)
    line = text.count("\n", 0, match.start()) + 1
    return f"{path.relative_to(root)}:{line}"


def _pytest(root: pathlib.Path, files, select: str | None, timeout: int):
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files]
    if select:
        cmd += ["-k", select]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                            timeout=timeout)
    lines = [l for l in result.stdout.splitlines() if l.strip()]
    return result.returncode, (lines[-1] if lines else result.stderr[-300:]), time.monotonic() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="run whole test files, not -k")
    parser.add_argument("--worktree", action="store_true", help="copy the working tree")
    parser.add_argument("--only", nargs="*", help="names of the mutations to run")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or m.name in args.only]

    with tempfile.TemporaryDirectory(prefix="stn_mutation_") as tmp:
        base = pathlib.Path(tmp) / "base"
        _copy_repo(base, args.worktree)
        files = sorted({f for m in mutations for f in m.files})
        select = None if args.full else " or ".join(f"({m.select})" for m in mutations)
        code, summary, seconds = _pytest(base, files, select, args.timeout)
        print(f"baseline (no mutation): {summary} [{seconds:.0f} s]", flush=True)
        if code != 0:
            print("the unmutated copy fails its tests: no mutation result means anything")
            return 2

        survivors, missing = [], []
        for m in mutations:
            copy = pathlib.Path(tmp) / m.name
            shutil.copytree(base, copy)
            try:
                where = _apply(copy, m)
            except LookupError as err:
                print(f"{m.name}: NOT APPLIED ({err})", flush=True)
                missing.append(m.name)
                continue
            code, summary, seconds = _pytest(copy, m.files, None if args.full else m.select,
                                             args.timeout)
            verdict = "killed" if code == 1 else ("SURVIVED" if code == 0 else f"error {code}")
            if code == 0:
                survivors.append(m.name)
            print(f"{m.name}: {verdict} -- {m.what} at {where}; {' '.join(m.files)}"
                  f"{'' if args.full else ' -k ' + repr(m.select)}: {summary} [{seconds:.0f} s]",
                  flush=True)
            shutil.rmtree(copy)

    print(f"{len(mutations) - len(survivors) - len(missing)} of {len(mutations)} killed; "
          f"survivors: {survivors or 'none'}; not applied: {missing or 'none'}")
    if missing:
        return 2
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
