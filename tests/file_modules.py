"""Loads a repository file that is not in a package (a script, a config) as a module."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(relative_path: str, name: str | None = None):
    """The module in ROOT / relative_path (e.g. "scripts/transformer_zoom.py"), executed once."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
