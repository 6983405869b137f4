"""Tests for configs/mnist_*.py: paper defaults, data fields, variants, locking, flags."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from stn_jax.data import distortions, pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {"mnist_r.py": "R", "mnist_rts.py": "RTS", "mnist_p.py": "P", "mnist_e.py": "E",
           "mnist_tc.py": "TC"}


def load(name: str):
    spec = importlib.util.spec_from_file_location(name[:-3], ROOT / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_paper_defaults(name):
    config = load(name).get_config()
    distortion = CONFIGS[name]
    assert config.data.to_dict() == dict(pipeline.default_data_config(distortion))
    assert (config.model.name, config.model.transform) == ("st_cnn", "affine")
    assert config.model.st_downsample == (2 if distortion in ("RTS", "TC") else 1)
    assert config.model.reference_width == 128
    train = config.train
    assert (train.batch_size, train.learning_rate, train.momentum) == (256, 0.01, 0.0)
    assert (train.lr_decay_every, train.lr_decay_factor, train.num_steps) == (50_000, 0.1, 150_000)
    assert train.weight_decay == 0.0
    assert config.runlocal is False


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_runlocal_shrinks_size_and_schedule_and_keeps_tc_at_full_resolution(name):
    paper, local = load(name).get_config(), load(name).get_config("runlocal=True")
    expected = dict(pipeline.default_data_config(CONFIGS[name]), num_train=local.data.num_train)
    assert local.data.to_dict() == expected
    assert 0 < local.data.num_train <= 5000
    assert local.train.num_steps * local.train.batch_size <= 200_000  # ~0.5% of the paper's work.
    assert local.train.lr_decay_every < local.train.num_steps  # The schedule is scaled too.
    # The one model change: on TC the transformer's output keeps the 60x60 input size, chosen
    # on a validation split (docs/results/tc_study.md).
    assert local.model.to_dict() == dict(
        paper.model.to_dict(), **({"st_downsample": 1} if CONFIGS[name] == "TC" else {}))
    assert local.runlocal is True


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_file_is_thin_and_documents_itself(name):
    source = (ROOT / "configs" / name).read_text()
    module = load(name)
    assert f"python -m experiments.train --config=configs/{name}" in module.__doc__
    assert "runlocal=True" in module.__doc__
    assert len(source.splitlines()) <= 40  # The shared pieces live in configs/common.py.
    imports = re.findall(r"^(?:import|from) .*$", source, re.M)
    assert [i for i in imports if i not in ("import os", "import sys")] == [
        "from configs import common  # noqa: E402  (the repository root is now importable)"]


def test_common_has_a_comment_per_field_and_one_source_of_paper_numbers():
    source = (ROOT / "configs" / "common.py").read_text()
    body = source[source.index("def mnist_config"):]
    assignments = [line for line in re.findall(r"^ +(?:config|data|model|train)\.\w+ = .*$",
                                               body, re.M) if "ConfigDict()" not in line]
    assert [line for line in assignments if "  # " not in line] == []  # A comment per field.
    # The distortion settings come from the one table the data code reads too.
    assert "PAPER_SETTINGS" in body and "canvas = " not in body
    config = load("mnist_p.py").get_config()
    for field, value in distortions.PAPER_SETTINGS["P"].items():
        assert config.data[field] == value, field


def test_config_loads_by_path_from_another_folder(tmp_path):
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('c', "
            f"{str(ROOT / 'configs' / 'mnist_tc.py')!r}); m = importlib.util.module_from_spec(spec);"
            " spec.loader.exec_module(m); print(m.get_config('model=cnn').data.canvas)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "60"


def _leaves(tree: dict) -> list:
    return [v for value in tree.values()
            for v in (_leaves(value) if isinstance(value, dict) else [value])]


def test_variants_and_their_errors():
    module = load("mnist_rts.py")
    config = module.get_config("model=cnn, transform=tps,runlocal=True")
    assert (config.model.name, config.model.transform, config.runlocal) == ("cnn", "tps", True)
    with pytest.raises(ValueError, match=r"'st_fcn'.*'st_cnn'"):
        module.get_config("model=stcnn")
    with pytest.raises(ValueError, match=r"'affine', 'projective', 'tps'"):
        module.get_config("transform=similarity")
    with pytest.raises(ValueError, match=r"did you mean 'model'\?.*'model', 'transform'"):
        module.get_config("modle=cnn")
    with pytest.raises(ValueError, match=r"key=value"):
        module.get_config("runlocal")


def test_config_is_locked():
    config = load("mnist_e.py").get_config()
    with pytest.raises(AttributeError, match="num_steps"):  # "Did you mean num_steps?"
        config.train.num_step = 10
    config.train.num_steps = 10  # Existing fields stay settable.
    assert config.train.num_steps == 10


def _parse(argv):
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return holder.value


def test_flag_overrides_and_typos():
    path = str(ROOT / "configs" / "mnist_rts.py")
    config = _parse(["prog", f"--config={path}:runlocal=True", "--config.train.num_steps=7"])
    assert config.train.num_steps == 7 and config.runlocal is True
    with pytest.raises(AttributeError, match="num_steps"):
        _parse(["prog", f"--config={path}", "--config.train.num_step=7"])
    with pytest.raises(flags.IllegalFlagValueError, match="num_steps"):
        _parse(["prog", f"--config={path}", "--config.train.num_steps=7.5"])


@pytest.mark.parametrize("args, message", [
    (["--config=configs/mnist_rts.py:runlocal=True", "--config.train.nmu_steps=3"],
     'unknown config field "nmu_steps": did you mean "num_steps"?'),
    (["--config=configs/mnist_rts.py:modle=cnn"], "did you mean 'model'?"),
    (["--config=configs/mnist_rts.py:model=resnet"], "valid values are ['fcn', 'cnn'"),
    (["--config=configs/nope.py"], "No such file or directory: 'configs/nope.py'"),
    (["--config=configs/mnist_rts.py", "--config.log_every=0"],
     "log_every must be a positive int, got 0"),
    (["--config=configs/mnist_rts.py", "--config.train.batch_size=-3"],
     "train.batch_size must be a positive int, got -3"),
    (["--config=configs/mnist_rts.py", "--config.train.num_steps=0"],
     "train.num_steps must be a positive int, got 0"),
])
def test_entry_point_config_errors_are_one_line_and_exit_2(tmp_path, args, message):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", *args, f"--workdir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_default_workdir_from_config_and_variants():
    from experiments import train as module

    assert module.default_workdir("configs/mnist_rts.py") == "runs/mnist_rts"
    assert module.default_workdir("/x/configs/mnist_tc.py:model=cnn, runlocal=True") == (
        "runs/mnist_tc_model=cnn,runlocal=True")
