"""CUB task and config: the issue's commands, metrics, pictures, and a short run of the loop."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from stn_jax.tasks import cub as cub_task
from stn_jax.tasks import get_task
from stn_jax.train import check_config, train_and_evaluate

import test_backbones
import test_data_cub

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cub_config", ROOT / "configs" / "cub.py")
cub_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cub_config)


def test_config_defaults_are_the_papers_and_runlocal_shrinks():
    config = cub_config.get_config("num_st=4,size=448")
    assert (config.task, config.model.backbone, config.model.num_st) == ("cub", "bn_inception", 4)
    assert (config.data.size, config.data.resize, config.model.crop_size) == (448, 512, 224)
    train = config.train
    assert (train.learning_rate, list(train.lr_boundaries), train.lr_decay_factor) == (
        0.1, [10_000, 20_000, 25_000], 0.1)
    assert (train.loc_lr_multiplier, config.model.dropout, config.model.scale) == (1e-4, 0.7, 0.5)
    local = cub_config.get_config("num_st=2,runlocal=True")
    assert (local.model.backbone, local.data.size, local.model.crop_size) == (
        "squeezenet1_1", 224, 112)
    assert local.train.loc_lr_multiplier == 1e-4 and local.model.dropout == 0.0
    assert cub_config.get_config("runlocal=True,backbone=bn_inception").model.backbone == (
        "bn_inception")
    with pytest.raises(ValueError, match="num_st='3': valid values are"):
        cub_config.get_config("num_st=3")
    with pytest.raises(AttributeError):
        cub_config.get_config().model.num_sts = 2  # locked


@pytest.mark.parametrize("args, message", [
    (["--config=configs/cub.py:num_st=4,size=448"], "config.data.dir must name the CUB_200_2011"),
    (["--config=configs/cub.py:num_st=0,size=224", "--config.data.dir=/nonexistent/CUB_200_2011"],
     "config.data.dir='/nonexistent/CUB_200_2011' is not a folder"),
])
def test_commands_without_data_fail_in_one_line(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "experiments.train", *args,
                             f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_bn_inception_weights_are_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("STN_JAX_WEIGHTS_DIR", str(tmp_path / "cache"))
    config = cub_config.get_config("num_st=0,size=224")
    config.unlock()
    config.data.dir = str(test_data_cub.write_layout(tmp_path))
    with pytest.raises(ValueError, match=r"config.model.weights: no bn_inception weights: "
                                         r"download .* and put it at .*cache"):
        check_config(config)


def test_class_ids_and_attention_boxes():
    assert cub_task.parse_class_ids("") is None
    assert cub_task.parse_class_ids("1-3, 7") == [1, 2, 3, 7]
    with pytest.raises(ValueError, match="data.class_ids: 'x' is not"):
        cub_task.parse_class_ids("x")
    assert cub_task.attention_box(np.array([0.5, 0.5, 0.5]), 8, 16) == (8.0, 4.0, 16.0, 8.0)


def test_metrics_overall_and_per_class():
    task = cub_task.CubTask(cub_config.get_config())
    task.class_names = ("a", "b", "c")
    logits = jnp.array([[5.0, 0, 0], [0, 5, 0], [5, 0, 0], [0, 0, 5], [0, 5, 0]])
    batch = {"label": jnp.array([0, 1, 1, 2, 2]), "mask": jnp.array([1, 1, 1, 1, 0.0])}
    sums = task.eval_sums(logits, batch)
    out = task.summarize({k: np.asarray(v) for k, v in sums.items()})
    assert out["num_test"] == 4
    assert out["test_error_pct"] == pytest.approx(25.0)  # 3 of the 4 real examples right
    assert out["test_accuracy_per_class"] == {"a": 1.0, "b": 0.5, "c": 1.0}


def test_short_run_of_the_loop_learns_nothing_wrong_and_draws_boxes(tmp_path):
    """Two steps of 2xST-CNN (SqueezeNet, random weights in a written Keras file) on the
    fixture layout: metrics.json, per-class accuracy and the picture with two boxes."""
    root = test_data_cub.write_layout(tmp_path)
    weights = tmp_path / "squeezenet.h5"
    test_backbones._write_random_keras_h5(weights, 0)
    config = cub_config.get_config("num_st=2,runlocal=True")
    config.unlock()
    config.data.dir, config.model.weights = str(root), str(weights)
    config.data.size, config.data.resize, config.model.crop_size = 64, 72, 32
    config.data.num_threads = 2
    config.train.batch_size = config.train.eval_batch_size = 2
    config.train.num_steps = config.eval_every = config.checkpoint_every = 2
    config.log_every, config.num_pictures = 1, 2
    task = check_config(config)
    assert isinstance(task, cub_task.CubTask) and isinstance(get_task(config), cub_task.CubTask)
    result = train_and_evaluate(config, str(tmp_path / "run"))
    assert result["steps"] == 2 and result["num_test"] == 2
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(saved["test_accuracy_per_class"]) == {"003.Sooty_Albatross",
                                                    "012.Yellow_headed_Blackbird"}
    assert 0 <= saved["test_error_pct"] <= 100
    from PIL import Image

    picture = np.asarray(Image.open(tmp_path / "run" / "pictures" / "step_000002.png"))
    # Both box colours are drawn (the transformers' regression starts at the tiling).
    for colour in cub_task.COLOURS[:2]:
        assert (picture[..., :3] == colour).all(-1).sum() > 50
