"""Times the jitted train step of ST-CNN and CNN (RTS, 42x42, batch 256) against PyTorch.

JAX: the models of ``stn_jax.models.mnist.create_model`` ("st_cnn", affine, ST output 21x21, and
"cnn") trained by the project's own step (``stn_jax.train.steps.make_train_step``: loss,
gradients, SGD update, metrics; state donated). PyTorch: the same architectures written below
(same layers, widths, ceil-mode pools, zero-initialised regression with the identity bias,
``affine_grid`` + ``grid_sample``), eager, ``torch.set_num_threads`` threads, SGD. The parameter
counts of the two are asserted equal. Both take the same fixed random batch (the data pipeline
is not timed).

Two ratios say what the transformer costs: ST-CNN over CNN (one of the targets in
docs/performance.md; the CNN sees the whole 42x42 canvas, so it is the slower one), and ST-CNN
over its own classifier alone ("st_cnn_head": the same CNN head and width on 21x21 inputs),
which isolates what the localisation net, grid and sampler add to a step.

The four steps take turns inside every repeat, so a burst of load from other processes hits all
of them alike; each reported time is the median over the repeats after warm-up. ``--methods``
also times the JAX ST-CNN with ``bilinear_sample(method=...)`` forced (e.g. "gather", the pure
JAX path) to show what the sampler's fast path is worth inside a whole step.

Usage::

  python scripts/benchmark_train.py                  # 20 repeats, methods auto and gather
  python scripts/benchmark_train.py --repeats 5 --methods auto --json /tmp/train.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import stn_jax  # noqa: E402
import stn_jax.transformer  # noqa: E402
from configs import mnist_rts  # noqa: E402
from stn_jax import tasks  # noqa: E402
from stn_jax.models import mnist  # noqa: E402
from stn_jax.train import state as train_state  # noqa: E402
from stn_jax.train import steps  # noqa: E402

INPUT_SHAPE = (42, 42, 1)  # RTS [P]
# The MNIST task's loss (cross-entropy) and metrics; the step needs only those of the task.
_TASK = tasks.get_task(mnist_rts.get_config())
ST_DOWNSAMPLE = 2  # the ST's output is 21x21 on RTS [S]
NUM_CLASSES = 10
LEARNING_RATE = 0.01


# ---------------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------------


def head_input(image: np.ndarray) -> np.ndarray:
    """The ST-CNN classifier's input size (21x21) for "st_cnn_head": every other pixel."""
    return image[:, ::ST_DOWNSAMPLE, ::ST_DOWNSAMPLE]


def jax_step(name: str, batch_np: dict, method: str | None):
    """A zero-argument callable running one jitted train step of `name` (and its width).

    `name` is a model of `mnist.create_model`, or "st_cnn_head": the ST-CNN's classifier alone
    (its width, on 21x21 inputs), to show what the transformer adds to a step.
    """
    if name == "st_cnn_head":
        width = mnist.solve_width("st_cnn", transform="affine", input_shape=INPUT_SHAPE,
                                  st_downsample=ST_DOWNSAMPLE)
        shape = (INPUT_SHAPE[0] // ST_DOWNSAMPLE, INPUT_SHAPE[1] // ST_DOWNSAMPLE, INPUT_SHAPE[2])
        model = mnist.MnistClassifier(
            "cnn", shape, width, mnist.CNNHead(shape, width, NUM_CLASSES, rngs=nnx.Rngs(0)))
        batch_np = dict(batch_np, image=head_input(batch_np["image"]))
    else:
        model = mnist.create_model(name, transform="affine", input_shape=INPUT_SHAPE,
                                   st_downsample=ST_DOWNSAMPLE, rngs=nnx.Rngs(0))
    tx = optax.sgd(LEARNING_RATE)
    schedule = optax.constant_schedule(LEARNING_RATE)
    mesh = steps.make_mesh(jax.devices()[:1])
    graphdef, params, model_state, constants = train_state.split_model(model)
    step_fn = steps.make_train_step(_TASK, graphdef, constants, tx, schedule, mesh,
                                    key=jax.random.key(0))
    holder = {"state": steps.replicate(
        train_state.create_train_state(params, model_state, tx), mesh)}
    batch = jax.device_put({k: jnp.asarray(v) for k, v in batch_np.items()})

    def run():
        holder["state"], metrics = step_fn(holder["state"], batch)
        jax.block_until_ready(metrics)
        return metrics

    # The step is traced and compiled by this first call; forcing the sampler's method for the
    # trace is the benchmark's knob (the transformer module has none).
    with _sampler_method(method):
        run()
    return run, model.width, mnist.count_params(model)


@contextlib.contextmanager
def _sampler_method(method: str | None):
    original = stn_jax.transformer.bilinear_sample
    if method is not None:
        stn_jax.transformer.bilinear_sample = functools.partial(original, method=method)
    try:
        yield
    finally:
        stn_jax.transformer.bilinear_sample = original


# ---------------------------------------------------------------------------------------------
# PyTorch: the same architectures
# ---------------------------------------------------------------------------------------------


def torch_models():
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    def pool(x):
        return F.max_pool2d(x, 2, 2, ceil_mode=True)

    class CNNHead(tnn.Module):
        def __init__(self, hw, channels, width):
            super().__init__()
            fh, fw = mnist.cnn_feature_shape(hw)
            self.conv1 = tnn.Conv2d(channels, width, 9)
            self.conv2 = tnn.Conv2d(width, width, 7)
            self.fc = tnn.Linear(fh * fw * width, NUM_CLASSES)

        def forward(self, x):
            x = pool(F.relu(self.conv1(x)))
            x = pool(F.relu(self.conv2(x)))
            return self.fc(x.flatten(1))

    class STCNN(tnn.Module):
        def __init__(self, width):
            super().__init__()
            h, w, c = INPUT_SHAPE
            fh, fw = mnist.loc_cnn_feature_shape((h, w))
            self.out_hw = (h // ST_DOWNSAMPLE, w // ST_DOWNSAMPLE)
            self.loc1 = tnn.Conv2d(c, mnist.LOC_CONV_FILTERS, 5)
            self.loc2 = tnn.Conv2d(mnist.LOC_CONV_FILTERS, mnist.LOC_CONV_FILTERS, 5)
            self.loc_fc = tnn.Linear(fh * fw * mnist.LOC_CONV_FILTERS, mnist.LOC_CONV_FC_UNITS)
            self.regression = tnn.Linear(mnist.LOC_CONV_FC_UNITS, 6)
            with torch.no_grad():
                self.regression.weight.zero_()
                self.regression.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]))
            self.head = CNNHead(self.out_hw, c, width)

        def forward(self, x):
            f = F.relu(self.loc1(pool(x)))
            f = F.relu(self.loc2(pool(f)))
            theta = self.regression(F.relu(self.loc_fc(f.flatten(1)))).view(-1, 2, 3)
            grid = F.affine_grid(theta, (x.shape[0], x.shape[1]) + self.out_hw, align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            return self.head(x)

    class CNN(tnn.Module):
        def __init__(self, width):
            super().__init__()
            self.head = CNNHead(INPUT_SHAPE[:2], INPUT_SHAPE[2], width)

        def forward(self, x):
            return self.head(x)

    class STCNNHead(tnn.Module):
        def __init__(self, width):
            super().__init__()
            h, w, c = INPUT_SHAPE
            self.head = CNNHead((h // ST_DOWNSAMPLE, w // ST_DOWNSAMPLE), c, width)

        def forward(self, x):
            return self.head(x)

    return {"st_cnn": STCNN, "cnn": CNN, "st_cnn_head": STCNNHead}


def torch_step(name: str, width: int, batch_np: dict):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch_models()[name](width)
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    image = batch_np["image"] if name != "st_cnn_head" else head_input(batch_np["image"])
    image = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
    label = torch.from_numpy(batch_np["label"].astype(np.int64))

    def run():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(image), label)
        loss.backward()
        opt.step()
        return loss

    return run, sum(p.numel() for p in model.parameters())


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Timing and report
# ---------------------------------------------------------------------------------------------


def time_interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def machine_info(threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "native_sampler": stn_jax._native.available(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if torch_available():
        import torch

        info["torch"] = torch.__version__
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
    parser.add_argument("--methods", default="auto,gather",
                        help="bilinear_sample methods for the JAX ST-CNN, comma-separated")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(0, 1, (args.batch_size,) + INPUT_SHAPE).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, args.batch_size).astype(np.int32),
    }
    fns, widths, counts = {}, {}, {}
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        fns[f"jax st_cnn [{method}]"], widths["st_cnn"], counts["st_cnn"] = jax_step(
            "st_cnn", batch, method)
    for name in ("st_cnn_head", "cnn"):
        fns[f"jax {name}"], widths[name], counts[name] = jax_step(name, batch, None)
    use_torch = torch_available() and not args.no_torch
    if use_torch:
        import torch

        torch.set_num_threads(args.threads)
        for name in ("st_cnn", "st_cnn_head", "cnn"):
            fns[f"torch {name}"], n = torch_step(name, widths[name], batch)
            if n != counts[name]:
                raise AssertionError(f"{name}: torch has {n} parameters, JAX {counts[name]}")

    info = machine_info(args.threads)
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    print(f"# widths {widths}, parameters {counts}, batch {args.batch_size}, input {INPUT_SHAPE}",
          flush=True)
    start = time.perf_counter()
    times = time_interleaved(fns, args.repeats, args.warmup)
    elapsed = time.perf_counter() - start
    medians = {name: statistics.median(t) for name, t in times.items()}

    rows = []
    for name, median in medians.items():
        framework, model = name.split(" ", 1)
        torch_name = "torch " + model.split(" ")[0]
        rows.append({
            "step": name,
            "median_ms": median * 1e3,
            "min_ms": min(times[name]) * 1e3,
            "steps_per_s": 1.0 / median,
            "jax_speed_over_torch": (medians[torch_name] / median
                                     if framework == "jax" and torch_name in medians else None),
        })
    header = f"{'step':<28} {'median ms':>10} {'min ms':>8} {'steps/s':>8} {'x torch speed':>14}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r['jax_speed_over_torch']:.2f}" if r["jax_speed_over_torch"] else "-"
        print(f"{r['step']:<28} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} "
              f"{r['steps_per_s']:>8.1f} {ratio:>14}")
    st_over_cnn = {f"jax [{m}]": medians[f"jax st_cnn [{m}]"] / medians["jax cnn"] for m in methods}
    st_over_head = {f"jax [{m}]": medians[f"jax st_cnn [{m}]"] / medians["jax st_cnn_head"]
                    for m in methods}
    if use_torch:
        st_over_cnn["torch"] = medians["torch st_cnn"] / medians["torch cnn"]
        st_over_head["torch"] = medians["torch st_cnn"] / medians["torch st_cnn_head"]
    print("# ST-CNN step time / CNN step time (CNN on the 42x42 input): "
          + ", ".join(f"{k} {v:.3f}" for k, v in st_over_cnn.items()))
    print("# ST-CNN step time / its classifier alone on 21x21 (the transformer's cost): "
          + ", ".join(f"{k} {v:.3f}" for k, v in st_over_head.items()))
    print(f"# {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "batch_size": args.batch_size, "repeats": args.repeats,
                       "warmup": args.warmup, "widths": widths, "param_counts": counts,
                       "results": rows, "st_cnn_over_cnn": st_over_cnn,
                       "st_cnn_over_its_classifier": st_over_head,
                       "elapsed_s": elapsed}, f, indent=1)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
