"""Times stn_jax.bilinear_sample against jax.scipy map_coordinates and torch grid_sample.

For every shape (B, H, W, C -> H', W') it builds one random image, one batch of random affine
grids (rotation, anisotropic scale, shear, translation, some points outside the image) and a
random output cotangent, then times, on the same data in the same run:

* ``fwd``: the sampled image;
* ``fwd+bwd``: the sampled image and the gradients to the image and to the grid (a VJP with the
  cotangent; for torch, ``out.backward(cotangent)``).

Implementations: ``stn_jax`` (``bilinear_sample``, method "auto", plus any forced methods given
with ``--methods``), ``map_coordinates`` (``jax.scipy.ndimage.map_coordinates``, order 1, zeros
outside, autodiff; vmapped over batch and channels) and ``torch`` (``grid_sample``, NCHW,
bilinear, zeros, align_corners=False) when torch is importable. JAX functions are jitted and
synchronised with ``block_until_ready``. ``--grids attention`` uses axis-aligned attention grids (eq. 2) instead, where
``method="separable"`` applies. The implementations take turns (a 10 ms pause, untimed calls
for ``--settle-ms``, then ``--block`` timed calls each), so a burst of load from other
processes hits all of them alike and no runtime's spinning worker threads are billed to the
next; the reported time ("median ms") is the median over the repeats after warm-up, and ratios
are to torch's median in the same run. "1st ms" is the median of the first call of each turn,
the first after 10 ms idle: worker threads park when idle and take tens of microseconds to
wake, which costs small shapes the most.

Peak memory: for JAX, XLA's buffer assignment of the compiled function (arguments + outputs +
temporaries, ``compiled.memory_analysis()``), also given as a multiple of the bytes of
(image + grid + output). For torch on CPU there is no allocator statistic; it reads "n/a".

Usage::

  python scripts/benchmark_sampler.py                       # all shapes, 20 repeats
  python scripts/benchmark_sampler.py --shapes 256x28x28x1-28x28 --repeats 5 --json /tmp/s.json
  python scripts/benchmark_sampler.py --methods gather,native --no-map-coordinates
  python scripts/benchmark_sampler.py --grids attention --methods gather,separable
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import stn_jax

DEFAULT_SHAPES = (
    "256x28x28x1-28x28",
    "256x42x42x1-42x42",
    "256x60x60x1-60x60",
    "64x64x64x3-64x64",
    "16x448x448x3-224x224",
    "32x32x32x64-32x32",
)


def parse_shape(text: str) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """'BxHxWxC-H'xW'' -> ((B, H, W, C), (H', W'))."""
    try:
        src, dst = text.split("-")
        b, h, w, c = (int(v) for v in src.split("x"))
        ho, wo = (int(v) for v in dst.split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"shape must look like 256x28x28x1-28x28, got {text!r}") from err
    return (b, h, w, c), (ho, wo)


def random_theta(rng: np.random.Generator, batch: int) -> np.ndarray:
    """(B, 2, 3) random affine maps near the identity: rotation +-45 deg, scale 0.7-1.3, shear,
    translation +-0.2, so that some samples fall outside the image."""
    angle = rng.uniform(-np.pi / 4, np.pi / 4, batch)
    scale = rng.uniform(0.7, 1.3, (batch, 2))
    shear = rng.uniform(-0.2, 0.2, batch)
    cos, sin = np.cos(angle), np.sin(angle)
    a = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    a = a @ np.stack([np.stack([np.ones(batch), shear], -1), np.stack([np.zeros(batch), np.ones(batch)], -1)], -2)
    a = a * scale[:, :, None]
    t = rng.uniform(-0.2, 0.2, (batch, 2, 1))
    return np.concatenate([a, t], axis=-1).astype(np.float32)


def random_attention(rng: np.random.Generator, batch: int) -> np.ndarray:
    """(B, 3) attention parameters (s, tx, ty): zoom 0.5-1.2, shift +-0.3 (axis-aligned grids)."""
    scale = rng.uniform(0.5, 1.2, (batch, 1))
    shift = rng.uniform(-0.3, 0.3, (batch, 2))
    return np.concatenate([scale, shift], axis=1).astype(np.float32)


def make_data(shape, out_shape, seed: int = 0, grids: str = "affine"):
    rng = np.random.default_rng(seed)
    b, h, w, c = shape
    image = rng.standard_normal(shape, dtype=np.float32)
    if grids == "attention":
        grid = np.array(stn_jax.attention_grid(jnp.asarray(random_attention(rng, b)), out_shape))
    else:
        grid = np.array(stn_jax.affine_grid(jnp.asarray(random_theta(rng, b)), out_shape))
    cot = rng.standard_normal((b,) + tuple(out_shape) + (c,), dtype=np.float32)
    return image, grid, cot


# ---------------------------------------------------------------------------------------------
# Implementations: each returns (fwd, fwd_bwd, memory) with zero-argument callables that run
# and synchronise once, and memory a dict {mode: bytes or None}.
# ---------------------------------------------------------------------------------------------


def _compiled_bytes(jitted, *args) -> int | None:
    try:
        analysis = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend or version provides it
        return None
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - getattr(analysis, "alias_size_in_bytes", 0)
    )


def _jax_impl(sample: Callable, image, grid, cot):
    image, grid, cot = (jax.device_put(jnp.asarray(x)) for x in (image, grid, cot))
    fwd = jax.jit(sample)

    @jax.jit
    def fwd_bwd(image, grid, cot):
        out, vjp = jax.vjp(sample, image, grid)
        d_image, d_grid = vjp(cot)
        return out, d_image, d_grid

    memory = {"fwd": _compiled_bytes(fwd, image, grid), "fwd+bwd": _compiled_bytes(fwd_bwd, image, grid, cot)}
    return (
        lambda: jax.block_until_ready(fwd(image, grid)),
        lambda: jax.block_until_ready(fwd_bwd(image, grid, cot)),
        memory,
    )


def stn_jax_impl(method: str | None):
    def build(image, grid, cot):
        if method is None:
            sample = stn_jax.bilinear_sample
        else:
            def sample(image, grid):
                return stn_jax.bilinear_sample(image, grid, method=method)
        return _jax_impl(sample, image, grid, cot)

    return build


def map_coordinates_impl(image, grid, cot):
    h, w = image.shape[1:3]

    def sample(image, grid):
        # align_corners=False unnormalisation, as grid_sample; order 1, zeros outside.
        x = ((grid[..., 0] + 1) * w - 1) / 2
        y = ((grid[..., 1] + 1) * h - 1) / 2

        def one_channel(img2d, y, x):
            return jax.scipy.ndimage.map_coordinates(img2d, [y, x], order=1, mode="constant", cval=0.0)

        per_channel = jax.vmap(one_channel, in_axes=(2, None, None), out_axes=-1)
        return jax.vmap(per_channel)(image, y, x)

    return _jax_impl(sample, image, grid, cot)


def torch_impl(image, grid, cot):
    import torch
    import torch.nn.functional as F

    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
    grid_t = torch.from_numpy(np.array(grid, copy=True))
    cot_t = torch.from_numpy(np.ascontiguousarray(cot.transpose(0, 3, 1, 2)))
    kwargs = dict(mode="bilinear", padding_mode="zeros", align_corners=False)

    def fwd():
        with torch.no_grad():
            return F.grid_sample(image_t, grid_t, **kwargs)

    def fwd_bwd():
        img = image_t.detach().requires_grad_(True)
        grd = grid_t.detach().requires_grad_(True)
        out = F.grid_sample(img, grd, **kwargs)
        out.backward(cot_t)
        return out, img.grad, grd.grad

    return fwd, fwd_bwd, {"fwd": None, "fwd+bwd": None}


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


SETTLE_S = 0.02  # untimed calls after each turn's pause (see time_interleaved)


def time_interleaved(fns: dict[str, Callable], repeats: int, warmup: int, block: int = 5,
                     pause: float = 0.01, settle: float = SETTLE_S) -> tuple[dict, dict]:
    """Runs every function `warmup` times, then rounds in which each function in turn sleeps
    `pause` seconds, makes untimed calls for `settle` seconds (at least one) and `block` timed
    calls, until each has `repeats` timings.

    Returns (times, first): the timed calls, and the first call of each turn (the first after
    `pause` idle seconds).

    Taking turns spreads bursts of load from other processes over all functions; the pause
    keeps one runtime's worker threads (torch's OpenMP threads spin for a while after each
    call) from stealing the cores from the calls timed after it. The settle time lets each
    runtime reach the state it has in a loop of calls: after 10 ms idle no worker thread of
    either runtime is spinning, and the first calls pay for waking them (the stn_jax 256x28x28
    forward timed alone this way on the 2-vCPU test VM: 0.19-0.22 ms for the first call,
    0.11 ms after the settle). The first call after the pause is reported as `first`.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    first = {name: [] for name in fns}
    while min(len(t) for t in times.values()) < repeats:
        for name, fn in fns.items():
            time.sleep(pause)
            start = time.perf_counter()
            fn()
            first[name].append(time.perf_counter() - start)
            while time.perf_counter() - start < settle:
                fn()
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times, first


def _to_nhwc(out) -> np.ndarray:
    out = out[0] if isinstance(out, tuple) else out
    if type(out).__module__.startswith("torch"):
        return out.detach().numpy().transpose(0, 2, 3, 1)
    return np.asarray(out)


def max_abs_diff(built) -> dict[str, float]:
    """Max |output - first implementation's output| of each forward (a sanity check)."""
    outs = {name: _to_nhwc(b[0]()) for name, b in built.items()}
    ref = next(iter(outs.values()))
    return {name: float(np.max(np.abs(out - ref))) for name, out in outs.items()}


def bench_shape(shape, out_shape, impls, repeats, warmup, grids="affine", block=5,
                settle=SETTLE_S):
    image, grid, cot = make_data(shape, out_shape, grids=grids)
    built = {name: build(image, grid, cot) for name, build in impls.items()}
    io_bytes = image.nbytes + grid.nbytes + cot.nbytes  # cot has the output's size
    diffs = max_abs_diff(built)
    rows = []
    for mode, pos in (("fwd", 0), ("fwd+bwd", 1)):
        times, first = time_interleaved({n: b[pos] for n, b in built.items()}, repeats, warmup,
                                        block, settle=settle)
        medians = {n: statistics.median(t) for n, t in times.items()}
        first_medians = {n: statistics.median(t) for n, t in first.items()}
        for name in built:
            mem = built[name][2][mode]
            rows.append(
                {
                    "shape": list(shape),
                    "out_shape": list(out_shape),
                    "mode": mode,
                    "impl": name,
                    "median_s": medians[name],
                    "min_s": min(times[name]),
                    "ratio_to_torch": medians[name] / medians["torch"] if "torch" in medians else None,
                    "first_after_idle_s": first_medians[name],
                    "first_ratio_to_torch": (first_medians[name] / first_medians["torch"]
                                             if "torch" in first_medians else None),
                    "peak_bytes": mem,
                    "peak_over_io": mem / io_bytes if mem else None,
                    "max_abs_diff": diffs[name],
                }
            )
    return rows


def machine_info(threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "numpy": np.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if torch_available():
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def format_table(rows) -> str:
    header = (f"{'shape':<24} {'mode':<8} {'impl':<22} {'median ms':>10} {'x torch':>8} "
              f"{'1st ms':>8} {'x torch':>8} {'peak MB':>8} {'peak/io':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        b, h, w, c = r["shape"]
        shape = f"{b}x{h}x{w}x{c}->{r['out_shape'][0]}x{r['out_shape'][1]}"
        ratio = f"{r['ratio_to_torch']:.2f}" if r["ratio_to_torch"] is not None else "-"
        mem = f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] else "n/a"
        over = f"{r['peak_over_io']:.1f}" if r["peak_over_io"] else "n/a"
        first_ratio = (f"{r['first_ratio_to_torch']:.2f}" if r["first_ratio_to_torch"] is not None
                       else "-")
        lines.append(f"{shape:<24} {r['mode']:<8} {r['impl']:<22} {r['median_s'] * 1e3:>10.3f} "
                     f"{ratio:>8} {r['first_after_idle_s'] * 1e3:>8.3f} {first_ratio:>8} {mem:>8} "
                     f"{over:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=lambda s: [parse_shape(t) for t in s.split(",")],
                        default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        help="comma-separated BxHxWxC-H'xW' (default: the six of docs/performance.md)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per shape and mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each function first")
    parser.add_argument("--block", type=int, default=5,
                        help="timed calls in a row per turn (1: strict alternation)")
    parser.add_argument("--settle-ms", type=float, default=SETTLE_S * 1e3,
                        help="untimed calls for this long after each turn's 10 ms pause, before "
                        "the timed block (at least one call; its time is the '1st ms' column)")
    parser.add_argument("--methods", default="",
                        help="extra forced stn_jax methods to time beside 'auto', comma-separated")
    parser.add_argument("--grids", choices=("affine", "attention"), default="affine",
                        help="random affine grids, or axis-aligned attention grids (eq. 2) on "
                        "which method 'separable' applies")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--no-map-coordinates", action="store_true", help="skip map_coordinates")
    parser.add_argument("--no-torch", action="store_true", help="skip torch even if importable")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    impls: dict[str, Callable] = {"stn_jax": stn_jax_impl(None)}
    for method in filter(None, args.methods.split(",")):
        impls[f"stn_jax[{method}]"] = stn_jax_impl(method)
    if not args.no_map_coordinates:
        impls["map_coordinates"] = map_coordinates_impl
    if not args.no_torch and torch_available():
        import torch

        torch.set_num_threads(args.threads)
        impls["torch"] = torch_impl

    info = machine_info(args.threads)
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    rows = []
    start = time.perf_counter()
    for shape, out_shape in args.shapes:
        shape_rows = bench_shape(shape, out_shape, impls, args.repeats, args.warmup, args.grids,
                                 args.block, args.settle_ms / 1e3)
        rows.extend(shape_rows)
        print(format_table(shape_rows), flush=True)
        print(flush=True)
    elapsed = time.perf_counter() - start
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    print(f"# summary ({elapsed:.0f} s)")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "grids": args.grids, "repeats": args.repeats,
                       "warmup": args.warmup, "block": args.block, "settle_ms": args.settle_ms,
                       "elapsed_s": elapsed, "results": rows}, f, indent=1)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
