"""How far a finished MNIST ST run's affine transformer zooms: the scale of its theta.

For each run folder (of `experiments.train` or `experiments.sweep`), restores the newest
checkpoint, draws a batch of fresh training-distribution images (the run's own generator and
digits, at a step the run never drew) and prints the statistics of sqrt|det A| over it, A the
2x2 part of the affine theta: 1 = the window is the whole input, 0.5 = half its side. On TC
(60x60, ST output 30x30) a scale near 1 means the transformer's output is the canvas at half
resolution; a scale near 0.47 would keep the 28x28 digit frame at full resolution.

Usage::

    python scripts/transformer_zoom.py RUN_DIR [RUN_DIR ...] [--images=512]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from stn_jax.train import loop  # noqa: E402

# A step no run of the project reaches, so the images are not ones a run trained on.
_PROBE_STEP = 10**9


def affine_scale(theta: np.ndarray) -> np.ndarray:
    """sqrt|det A| of each (B, 6) or (B, 2, 3) affine theta; (B,).

    Example:
        >>> affine_scale(np.array([[0.5, 0, 0.1, 0, 0.5, -0.2]]))
        array([0.5])
    """
    theta = np.asarray(theta, np.float64).reshape(-1, 2, 3)
    return np.sqrt(np.abs(np.linalg.det(theta[:, :, :2])))


def run_zoom(workdir: str, *, images: int) -> dict:
    """Restores the newest checkpoint of `workdir` and returns its step and scale statistics."""
    config = loop.read_config(workdir)
    if config.task != "mnist" or not config.model.name.startswith("st_") or (
            config.model.transform != "affine"):
        raise ValueError(f"workdir={workdir!r}: not an MNIST ST run with an affine transformer")
    run = loop.load_run(workdir)
    batch = run.dataset.train_batch(_PROBE_STEP, images)
    theta = run.model.transformer.theta(batch["image"])
    scale = affine_scale(np.asarray(theta))
    return {"step": run.step, "mean": float(scale.mean()),
            "std": float(scale.std()), "min": float(scale.min()), "max": float(scale.max())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="run folders")
    parser.add_argument("--images", type=int, default=512, help="images to measure on")
    args = parser.parse_args(argv)
    for workdir in args.workdirs:
        try:
            z = run_zoom(workdir, images=args.images)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{os.path.basename(os.path.normpath(workdir))}: step {z['step']}, scale mean "
              f"{z['mean']:.3f} (std {z['std']:.3f}, min {z['min']:.3f}, max {z['max']:.3f})",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
