"""scripts/benchmark_train.py runs end to end on the current training step (a tiny batch).

The script builds the project's own jitted step (`stn_jax.train.steps.make_train_step`), so a
change of that API breaks it; this runs its cheapest step once on two images, and its torch twin where torch is installed.
"""


import numpy as np
import pytest

import file_modules


@pytest.fixture(scope="module")
def benchmark_train():
    return file_modules.load("scripts/benchmark_train.py")


def test_benchmark_train_steps_run_and_match_torch(benchmark_train):
    # The cheapest of its steps (the ST-CNN's classifier alone, 21x21), two images: the JAX
    # step through the project's own make_train_step, and the torch twin's parameter count.
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(0, 1, (2, 42, 42, 1)).astype(np.float32),
             "label": np.array([3, 7], np.int32)}
    run, width, count = benchmark_train.jax_step("st_cnn_head", batch, None)
    metrics = run()
    assert np.isfinite(float(metrics["loss"]))
    # The Table-1 width and parameter count on RTS (docs/performance.md, "Training step").
    assert (width, count) == (67, 226202)
    if benchmark_train.torch_available():
        torch_run, torch_count = benchmark_train.torch_step("st_cnn_head", width, batch)
        assert torch_count == count
        assert np.isfinite(torch_run().item())
