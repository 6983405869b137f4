"""Data parallelism: a step on 4 (fake CPU) devices equals the same step on 1 device.

XLA's device count is fixed when jax starts, so the checks run in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import importlib.util, json, sys
import jax, jax.numpy as jnp, ml_collections, numpy as np
from flax import nnx
from stn_jax.models import mnist
from stn_jax.train import create_train_state, learning_rate_schedule, make_optimizer
from stn_jax.train import steps, train_and_evaluate

assert len(jax.devices()) == 4, jax.devices()
cfg = ml_collections.ConfigDict(dict(learning_rate=0.01, momentum=0.9, lr_decay_every=100,
                                     lr_decay_factor=0.1, weight_decay=0.0))
tx, schedule = make_optimizer(cfg), learning_rate_schedule(cfg)
rng = np.random.default_rng(0)
batches = [{"image": rng.random((8, 28, 28, 1), np.float32),
            "label": rng.integers(0, 10, 8).astype(np.int32)} for _ in range(3)]
model = mnist.create_model("st_cnn", input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
graphdef, init, rest = nnx.split(model, nnx.Param, ...)
flat = lambda tree: np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])
out = {"init": flat(init).tolist()}
for n in (1, 4):
    mesh = steps.make_mesh(jax.devices()[:n])
    params = jax.tree.map(jnp.copy, init)  # The step donates its state; init must survive.
    state = jax.device_put(create_train_state(params, tx), steps.replicated(mesh))
    train_step = steps.make_train_step(graphdef, rest, tx, schedule, mesh)
    losses = []
    for i, batch in enumerate(batches):
        batch = jax.device_put(batch, steps.batch_sharded(mesh))
        assert len(batch["image"].sharding.device_set) == n
        state, metrics = train_step(state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    leaf = jax.tree.leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == n and leaf.sharding.is_fully_replicated
    out[n] = {"losses": losses, "params": flat(state.params).tolist()}

spec = importlib.util.spec_from_file_location("c", "configs/mnist_r.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config("runlocal=True")
config.train.batch_size = 6
try:
    train_and_evaluate(config, sys.argv[1])
    out["error"] = None
except ValueError as e:
    out["error"] = str(e)
print("RESULT" + json.dumps(out))
"""


def test_four_devices_match_one_and_indivisible_batch_fails(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", _SCRIPT, str(workdir)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    one, four = out["1"], out["4"]
    # The same loss: the mean over the batch does not depend on how the batch is split...
    assert 2.0 < one["losses"][0] < 3.0  # About log(10) at init: a real loss.
    for a, b in zip(one["losses"], four["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a), (one["losses"], four["losses"])
    assert one["losses"][2] != one["losses"][0]  # ...and the steps did move the parameters.
    # ...and the same parameters after 3 steps of SGD with momentum, up to the summation order
    # of the gradient all-reduce (differences ~1e-8 here, where the steps moved them ~1e-3..0.08).
    init, p1, p4 = (np.asarray(x) for x in (out["init"], one["params"], four["params"]))
    assert p1.shape == p4.shape == init.shape
    assert np.abs(p1 - init).max() > 1e-2
    np.testing.assert_allclose(p4, p1, rtol=1e-5, atol=1e-6)
    assert "train.batch_size=6" in out["error"] and "(4)" in out["error"]
    assert not workdir.exists()  # Refused before any work.
