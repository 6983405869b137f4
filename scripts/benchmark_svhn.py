r"""SVHN family: train-step time of CNN, ST-CNN Single and Multi side by side, and the input
pipeline's images/s against what the step consumes.

    python scripts/benchmark_svhn.py                         # runlocal config, 64 px
    python scripts/benchmark_svhn.py --variant=size=64 --steps=20   # the paper's config

Every model's jitted train step (the loop's own `make_train_step`) is compiled first, then the
steps run round-robin (one step of each model per round, the same batch), so that a busy
machine slows all of them alike; the table gives each model's median step time and its ratio
to the CNN's (the paper: ST-CNN Multi 1.06x the CNN). The pipeline is timed alone:
`dataset.train_batch` for consecutive steps, blocked until ready.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import svhn as svhn_config  # noqa: E402
from stn_jax import tasks  # noqa: E402
from stn_jax.models import count_params  # noqa: E402
from stn_jax.train import state as state_lib  # noqa: E402
from stn_jax.train import steps  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="runlocal=True", help="configs/svhn.py variants")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds")
    parser.add_argument("--pipeline_steps", type=int, default=10)
    args = parser.parse_args()

    mesh = steps.make_mesh()
    sharding = steps.batch_sharded(mesh)
    runs = {}
    dataset = None
    for name in ("cnn", "st_single", "st_multi"):
        config = svhn_config.get_config(f"{args.variant},model={name}")
        task = tasks.get_task(config)
        task.check_config()
        dataset = dataset or task.make_dataset()
        model = task.create_model(dataset, rngs=nnx.Rngs(0))
        tx = state_lib.make_optimizer(config.train,
                                      param_labels=state_lib.transformer_labels(model))
        schedule = state_lib.learning_rate_schedule(config.train)
        model.train()
        graphdef, params, model_state, constants = state_lib.split_model(model)
        state = steps.replicate(state_lib.create_train_state(params, model_state, tx), mesh)
        step = steps.make_train_step(task, graphdef, constants, tx, schedule, mesh,
                                     key=jax.random.key(0))
        runs[name] = {"step": step, "state": state, "params": count_params(model),
                      "times": [], "batch_size": config.train.batch_size}
    batch_size = runs["cnn"]["batch_size"]
    batch = dataset.train_batch(0, batch_size, sharding=sharding)
    for name, run in runs.items():
        begin = time.perf_counter()
        run["state"], metrics = run["step"](run["state"], batch)
        jax.block_until_ready(metrics)
        print(f"{name}: {run['params']:,} params; compiled + first step "
              f"{time.perf_counter() - begin:.1f} s", flush=True)
    for _ in range(args.steps):
        for run in runs.values():
            begin = time.perf_counter()
            run["state"], metrics = run["step"](run["state"], batch)
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - begin)
    cnn = np.median(runs["cnn"]["times"])
    print(f"\nbatch {batch_size}, image {dataset.image_shape}, {args.steps} rounds, "
          f"{len(jax.devices())} {jax.devices()[0].platform} device(s)")
    print("| model | median step (ms) | min (ms) | / CNN | images/s consumed |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        t = np.median(run["times"])
        print(f"| {name} | {1e3 * t:.0f} | {1e3 * min(run['times']):.0f} | {t / cnn:.2f} | "
              f"{batch_size / t:.0f} |")

    begin = time.perf_counter()
    for s in range(1, args.pipeline_steps + 1):
        jax.block_until_ready(dataset.train_batch(s, batch_size, sharding=sharding))
    per_batch = (time.perf_counter() - begin) / args.pipeline_steps
    fastest = min(np.median(r["times"]) for r in runs.values())
    print(f"\npipeline ({dataset.source}): {1e3 * per_batch:.0f} ms a batch, "
          f"{batch_size / per_batch:.0f} images/s; headroom over the fastest step: "
          f"{fastest / per_batch:.1f}x")


if __name__ == "__main__":
    main()
