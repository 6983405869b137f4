"""pyproject.toml's lower bounds are exactly the versions .ci/constraints-min.txt pins (and
.ci/run tests); in the environment of that CI step, they are the installed versions."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _lower_bounds() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    bounds = {}
    for requirement in dependencies:
        match = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", requirement)
        assert match, f"{requirement!r}: every dependency needs a lower bound"
        bounds[_name(requirement)] = match.group(1)
    return bounds


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "constraints-min.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version.strip()
    return pins


def _release(version: str) -> tuple[int, ...]:
    """(2, 0, 0) for "2.0" and "2.0.0": pip treats them as the same version."""
    parts = [int(p) for p in re.findall(r"\d+", version.split("rc")[0])]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def test_constraints_pin_exactly_the_lower_bounds():
    bounds, pins = _lower_bounds(), _pins()
    assert sorted(pins) == sorted(bounds)
    for name, bound in bounds.items():
        assert _release(pins[name]) == _release(bound), (name, pins[name], bound)


def test_release_compares_like_pip():
    assert _release("2.0") == _release("2.0.0") == (2,)
    assert _release("0.11.17") == (0, 11, 17) != _release("0.11.1")


def test_installed_versions_meet_the_bounds():
    # In .ci/run's second environment this checks the constraints were applied (== the bound).
    for name, bound in _lower_bounds().items():
        installed = importlib.metadata.version(name)
        assert _release(installed) >= _release(bound), (name, installed, bound)
        if os.environ.get("STN_JAX_EXPECT_MIN_VERSIONS") == "1":
            assert _release(installed) == _release(bound), (name, installed, bound)
