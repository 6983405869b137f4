"""scripts/accelerator_report.py runs end to end on the CPU at tiny sizes, so it cannot rot
before an accelerator runs it: every section succeeds, its numerics checks pass, the byte
counts and ratios it reports are the ones it should compute, and it never imports the
modules the accelerator image lacks."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SCRIPT = _REPO / "scripts" / "accelerator_report.py"
_NOT_ON_TARGET = ("ml_collections", "tensorboardX", "tensorflow_datasets")


# One xdist worker runs this file (`pytest -n 2 --dist loadgroup`), so that the report (a tiny run of the whole script, 30-75 s)
# is built once, not once per worker.
pytestmark = pytest.mark.xdist_group("accelerator_report")


def test_xdist_groups_hold_under_loadgroup(request):
    """The suite's `--dist loadgroup` keeps this file on one worker; pytest-xdist marks that by
    appending the group to the node id. pytest 9.2 silently undid it (pytest-xdist#1386), and
    the report then ran on both workers (2 x 32 s); pyproject.toml caps pytest for that."""
    # Set on each xdist worker when the run has `--dist loadgroup`.
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("runs only under `pytest -n N --dist loadgroup` (the README's command)")
    assert request.node.nodeid.endswith("@" + pytestmark.args[0]), (
        f"{request.node.nodeid}: xdist_group is ignored by this pytest "
        f"{pytest.__version__}; see the pytest bound in pyproject.toml")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("accelerator_report")
    # Shadow the modules the GPU image lacks with packages that fail to import, so that the
    # run proves the script does without them.
    blocked = tmp / "blocked"
    for name in _NOT_ON_TARGET:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            "raise ImportError('not on the accelerator image')\n")
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(blocked), os.environ.get("PYTHONPATH")])),
        # The pure-JAX path only: no first-use build of the native kernels (8 s) in this test.
        STN_JAX_NATIVE="0",
        # A tiny run's timings mean nothing; XLA's cheapest CPU compiles halve the run's time.
        XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    )
    out = tmp / "out"
    res = subprocess.run(
        [sys.executable, str(_SCRIPT), "--tiny", "--paper_schedule", "--max_minutes", "10",
         "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]
    data = json.loads((out / "report.json").read_text())
    data["_markdown"] = (out / "report.md").read_text()
    return data


def test_every_section_ran_and_nothing_missing_on_the_target_was_imported(report):
    for section in ("environment", "numerics", "copy", "sampler", "train_steps",
                    "input_pipeline", "paper_schedule"):
        assert report[section]["status"] == "ok", (section, report[section].get("error"))
    assert report["modules_not_on_target_imported"] == []
    assert report["environment"]["backend"] == "cpu"
    assert report["environment"]["devices"] == ["cpu:cpu"]
    for heading in ("## Numerics", "## Copy bandwidth", "## bilinear_sample against grid_sample",
                    "## Train steps", "## Input pipeline", "## Paper schedule"):
        assert heading in report["_markdown"]


def test_numerics_checks_passed_against_float64_torch(report):
    numerics = report["numerics"]
    assert numerics["passed"] is True
    rows = numerics["sampler"]
    checked = {(r["method"], r["dtype"]) for r in rows}
    assert {("gather", "float32"), ("gather", "bfloat16"), ("auto", "float32"),
            ("separable", "float32"), ("separable", "bfloat16"),
            ("torch grid_sample (cpu)", "float32")} <= checked
    for r in rows:
        assert r["reference"] == "torch float64 (cpu)"
        assert len(r["rel_err"]) == 3  # output, image gradient, grid gradient
        tol = {"float32": 1e-4, "bfloat16": 1e-2}[r["dtype"]]
        assert r["passed"] and all(0 <= e < tol for e in r["rel_err"]), r
        if r["dtype"] == "float32":
            # float32 against float64: rounding only, far under the tolerance.
            assert max(r["rel_err"]) < 1e-5, r
        else:
            # bf16 output and image gradient carry bf16 rounding (2^-9 relative), well above
            # float32's; the grid gradient is accumulated in float32.
            assert 1e-4 < r["rel_err"][0] < 1e-2 and r["rel_err"][2] < 1e-5, r
    model = numerics["model"]
    # On the CPU the "device" is the CPU itself: the same program gives the same numbers.
    assert model["same_device"] is True
    assert model["loss_device"] == model["loss_cpu"]
    assert model["grad_rel_err"] == 0.0


def test_sampler_rows_count_bytes_and_ratios(report):
    # --tiny: one shape, 4x12x12x1 -> 10x10: image 576 values, grid 400 points, output 400.
    rows = [r for r in report["sampler"]["rows"] if "error" not in r]
    assert not [r for r in report["sampler"]["rows"] if "error" in r]
    expected_fwd = {  # image + grid + output bytes
        "stn_jax gather float32": 576 * 4 + 800 * 4 + 400 * 4,
        "stn_jax gather bfloat16": 576 * 2 + 800 * 4 + 400 * 2,
        "stn_jax separable float32": 576 * 4 + 800 * 4 + 400 * 4,
        "stn_jax separable bfloat16": 576 * 2 + 800 * 4 + 400 * 2,
        "torch float32": 576 * 4 + 800 * 4 + 400 * 4,
        "torch bfloat16": 576 * 2 + 800 * 2 + 400 * 2,  # torch's bf16 takes a bf16 grid
    }
    floor = report["copy"]["floor_bytes_per_s"]
    assert floor > 0
    seen = set()
    for r in rows:
        out_bytes = 400 * (2 if "bfloat16" in r["impl"] else 4)
        fwd = expected_fwd[r["impl"]]
        # fwd+bwd: + cotangent read; output, image gradient and grid gradient written.
        assert r["bytes"] == (fwd if r["mode"] == "fwd" else 2 * fwd + out_bytes), r
        assert r["median_s"] > 0 and r["min_s"] <= r["median_s"]
        assert r["bytes_per_s"] == pytest.approx(r["bytes"] / r["median_s"])
        assert r["fraction_of_copy"] == pytest.approx(r["bytes_per_s"] / floor)
        torch_row = next(t for t in rows if t["impl"] == "torch float32"
                         and t["mode"] == r["mode"] and t["grids"] == r["grids"])
        assert r["ratio_to_torch_f32"] == pytest.approx(r["median_s"] / torch_row["median_s"])
        seen.add((r["grids"], r["mode"], r["impl"]))
    for mode in ("fwd", "fwd+bwd"):
        assert {("affine", mode, "stn_jax gather float32"), ("affine", mode, "torch bfloat16"),
                ("attention", mode, "stn_jax separable bfloat16")} <= seen


def test_train_steps_and_input_pipeline(report):
    from stn_jax.models import mnist

    steps = report["train_steps"]
    by_model = {r["model"]: r for r in steps["rows"]}
    assert set(by_model) == {"fcn", "st_fcn"}  # --tiny's stand-ins for the CNN pair
    for name, r in by_model.items():
        width = mnist.solve_width(name, input_shape=(42, 42, 1), st_downsample=2)
        assert r["params"] == mnist.param_count(name, width, input_shape=(42, 42, 1),
                                                st_downsample=2)
        assert r["steps_per_s"] == pytest.approx(1 / r["step_s"])
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_s"])
    assert steps["ratios"]["st_fcn_over_fcn_step_time"] == pytest.approx(
        by_model["st_fcn"]["step_s"] / by_model["fcn"]["step_s"])
    pipeline = report["input_pipeline"]
    assert pipeline["digits"] == "bundled"
    (rts,) = pipeline["rows"]
    assert rts["distortion"] == "RTS"
    assert rts["device_images_per_s"] > 0 and rts["host_fed_images_per_s"] > 0


def test_paper_schedule_is_shrunk_to_fit_and_evaluated(report):
    paper = report["paper_schedule"]
    assert paper["paper_steps"] == 150_000
    # --tiny caps it at 12 steps: the schedule shrinks, the lr dropping every third of it.
    assert paper["steps_done"] == paper["planned_steps"] == 12
    assert paper["schedule_scaled"] is True and paper["decay_every"] == 4
    assert not paper["stopped_early"]
    assert paper["steps_per_s"] > 0 and paper["train_wall_s"] > paper["compile_s"] > 0
    wrong = paper["test_error_percent"] / 100 * 1000  # of the 1,000 bundled test digits
    assert 0 <= wrong <= 1000 and wrong == pytest.approx(round(wrong))


# ------------------------------------------------------------ scripts/offline_wheels.py


@pytest.fixture(scope="module")
def offline_wheels():
    sys.path.insert(0, str(_REPO / "scripts"))
    try:
        import offline_wheels
    finally:
        sys.path.remove(str(_REPO / "scripts"))
    return offline_wheels


def _installed(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed here")


def test_offline_wheels_walks_requirements_and_skips_what_the_target_has(offline_wheels):
    env = offline_wheels.target_environment("3.12")
    yaml, absl = _installed("PyYAML"), _installed("absl-py")
    # ml_collections needs absl-py and PyYAML; its "dev" extra (pytest, ...) is not brought.
    pins, unpinned = offline_wheels.needed_wheels(["ml_collections"], {}, env)
    assert pins == {"absl-py": f"absl-py=={absl}",
                    "ml-collections": f"ml_collections=={_installed('ml_collections')}",
                    "pyyaml": f"PyYAML=={yaml}"}
    assert unpinned == {}
    # What the target has (any version, or one that satisfies the specifier) stays there.
    pins, _ = offline_wheels.needed_wheels(["ml_collections"], {"absl-py": None, "pyyaml": "6.0"},
                                           env)
    assert list(pins) == ["ml-collections"]
    # tensorboardX needs protobuf>=3.20: a target with 3.19 gets the version installed here.
    have = {"numpy": None, "packaging": None, "protobuf": "3.19.0"}
    pins, _ = offline_wheels.needed_wheels(["tensorboardX"], have, env)
    assert pins == {"protobuf": f"protobuf=={_installed('protobuf')}",
                    "tensorboardx": f"tensorboardX=={_installed('tensorboardX')}"}


def test_offline_wheels_for_the_gpu_image_and_its_commands(offline_wheels, capsys):
    assert offline_wheels.main([]) == 0
    out = capsys.readouterr().out
    reqs = offline_wheels.project_requirements(_REPO / "pyproject.toml", ())
    pins, _ = offline_wheels.needed_wheels(reqs, offline_wheels.read_have(None),
                                           offline_wheels.target_environment("3.12"))
    # The image has jax, flax, optax, orbax, absl-py, pillow, numpy; not these three.
    assert {"ml-collections", "tensorboardx", "tensorflow-datasets"} <= set(pins)
    assert not {"jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint"} & set(pins)
    assert f"for p in {' '.join(pins.values())}; do" in out
    assert "--only-binary=:all: --python-version 3.12 --implementation cp" in out
    assert "--platform manylinux2014_x86_64" in out
    assert "pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl" in out
    assert "pip install --no-index --no-deps --no-build-isolation -e ." in out
