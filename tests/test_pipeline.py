"""Tests for stn_jax.data.pipeline.DistortedMNIST: config, determinism, epochs, test set."""

import ml_collections
import numpy as np
import pytest

from stn_jax.data import mnist
from stn_jax.data import pipeline

BRIEF_FIELDS = (
    "source", "tfds_dir", "idx_dir", "distortion", "fixed_train", "test_seed",
    "bundled_test_fraction", "num_train", "num_test", "canvas", "rotation_deg", "scale_min",
    "scale_max", "corner_std_px", "control_std_px", "control_grid_size", "clutter_count",
    "clutter_size", "clutter_combine",
)


def _config(distortion="R", **overrides):
    cfg = pipeline.default_data_config(distortion)
    cfg.update(source="bundled", num_train=64, num_test=24)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def test_default_configs_have_the_agreed_fields_and_numbers():
    assert pipeline.DATA_FIELDS == BRIEF_FIELDS
    expected = {
        "R": (28, 90.0, 1.0, 1.0),
        "RTS": (42, 45.0, 0.7, 1.2),
        "P": (28, 0.0, 0.75, 1.0),
        "E": (28, 0.0, 0.75, 1.0),
        "TC": (60, 0.0, 1.0, 1.0),
    }
    for name, (canvas, rot, lo, hi) in expected.items():
        cfg = pipeline.default_data_config(name)
        assert tuple(cfg) == BRIEF_FIELDS
        assert (cfg["canvas"], cfg["rotation_deg"], cfg["scale_min"], cfg["scale_max"]) == (
            canvas, rot, lo, hi)
        assert cfg["distortion"] == name and cfg["source"] == "auto" and cfg["tfds_dir"] == ""
        assert (cfg["corner_std_px"], cfg["control_std_px"], cfg["control_grid_size"]) == (
            5.0, 1.5, 4)
        assert (cfg["clutter_count"], cfg["clutter_size"], cfg["num_train"]) == (6, 6, -1)
        assert cfg["clutter_combine"] == "add"


def test_bad_config_values_are_value_errors():
    with pytest.raises(ValueError, match=r"one of \('R', 'RTS', 'P', 'E', 'TC'\), got 'X'"):
        pipeline.DistortedMNIST(_config(distortion="X"), seed=0)
    with pytest.raises(ValueError, match=r"source must be one of .*'auto'.*got 'web'"):
        pipeline.DistortedMNIST(_config(source="web"), seed=0)
    with pytest.raises(ValueError, match=r"unknown fields \['canvass'\]"):
        pipeline.DistortedMNIST({**_config(), "canvass": 30}, seed=0)
    with pytest.raises(ValueError, match=r"num_train=5000 exceeds the 4000"):
        pipeline.DistortedMNIST(_config(num_train=5000), seed=0)
    with pytest.raises(ValueError, match=r"clutter_combine must be one of \('add', 'max'\)"):
        pipeline.DistortedMNIST(_config("TC", clutter_combine="sum"), seed=0)


def test_batches_are_the_digits_and_labels_of_the_permutation():
    # rotation_deg = 0: the R images are the digits themselves, so images and labels can be
    # matched against the training digits.
    ds = pipeline.DistortedMNIST(_config(rotation_deg=0.0), seed=0)
    assert ds.source == "bundled" and ds.num_classes == 10
    assert ds.image_shape == (28, 28, 1) and ds.num_train == 64 and ds.num_test == 24
    digits = mnist.load_mnist(source="bundled")
    subset = np.sort(np.random.default_rng(0).permutation(4000)[:64])
    seen = []
    for step in range(2):  # two batches of 32 = one epoch of 64
        batch = ds.train_batch(step, 32)
        assert batch["image"].dtype == np.float32 and batch["image"].shape == (32, 28, 28, 1)
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (32,)
        index = ds.train_indices(step, 32)
        np.testing.assert_allclose(
            batch["image"][..., 0], digits.train_images[subset[index]] / 255.0, atol=1e-5
        )
        np.testing.assert_array_equal(batch["label"], digits.train_labels[subset[index]])
        seen.extend(index)
    assert sorted(seen) == list(range(64))  # an epoch visits every digit once


def test_train_batch_is_a_pure_function_of_seed_step_and_batch_size():
    a = pipeline.DistortedMNIST(_config(), seed=3)
    b = pipeline.DistortedMNIST(_config(), seed=3)
    c = pipeline.DistortedMNIST(_config(), seed=4)
    sequential = [a.train_batch(step, 16) for step in range(6)]
    resumed = b.train_batch(5, 16)  # a restarted run asks for step 5 first
    np.testing.assert_array_equal(resumed["image"], sequential[5]["image"])
    np.testing.assert_array_equal(resumed["label"], sequential[5]["label"])
    np.testing.assert_array_equal(b.train_batch(0, 16)["image"], sequential[0]["image"])
    assert np.abs(c.train_batch(5, 16)["image"] - resumed["image"]).mean() > 1e-3
    # A batch straddling two epochs (64 digits, batches of 48): positions 48..95.
    straddle = a.train_indices(1, 48)
    np.testing.assert_array_equal(straddle[:16], a.train_indices(3, 16))
    np.testing.assert_array_equal(straddle[16:], a.train_indices(2, 32))  # 64..95
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        a.train_batch(-1, 16)


def _image_of_digit_per_epoch(ds, digit, batch_size=32):
    """The image the batches give `digit` in epochs 0 and 1 (64 digits per epoch)."""
    found = []
    for epoch in range(2):
        for step in range(epoch * 2, epoch * 2 + 2):
            index = ds.train_indices(step, batch_size)
            if digit in index:
                found.append(ds.train_batch(step, batch_size)["image"][list(index).index(digit)])
    return found


def test_distortions_are_redrawn_each_epoch_unless_fixed_train():
    fresh = pipeline.DistortedMNIST(_config(), seed=0)
    first, second = _image_of_digit_per_epoch(fresh, digit=7)
    assert np.abs(first - second).mean() > 1e-3
    assert not np.array_equal(fresh.train_indices(0, 32), fresh.train_indices(2, 32))

    fixed = pipeline.DistortedMNIST(_config(fixed_train=True), seed=0)
    first, second = _image_of_digit_per_epoch(fixed, digit=7)
    np.testing.assert_array_equal(first, second)
    # Stored as uint8: values are multiples of 1/255, and the fixed set is seeded.
    np.testing.assert_allclose(first * 255.0, np.round(first * 255.0), atol=1e-3)
    again = pipeline.DistortedMNIST(_config(fixed_train=True), seed=0)
    np.testing.assert_array_equal(
        again.train_batch(1, 32)["image"], fixed.train_batch(1, 32)["image"]
    )


def test_test_set_depends_on_test_seed_only():
    a = pipeline.DistortedMNIST(_config(), seed=0).test_set
    b = pipeline.DistortedMNIST(_config(), seed=1).test_set
    c = pipeline.DistortedMNIST(_config(test_seed=5), seed=0).test_set
    assert a["image"].shape == (24, 28, 28, 1) and a["image"].dtype == np.float32
    assert a["label"].shape == (24,) and a["label"].dtype == np.int32
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], c["label"])
    assert np.abs(a["image"] - c["image"]).mean() > 1e-3
    # Test digits are the bundled test split (24 of its 1000), distinct from the train digits.
    bundled = mnist.load_mnist(source="bundled")
    subset = np.sort(np.random.default_rng(0).permutation(1000)[:24])
    np.testing.assert_array_equal(a["label"], bundled.test_labels[subset])


def test_test_set_is_generated_in_padded_chunks(monkeypatch):
    monkeypatch.setattr(pipeline, "_CHUNK", 10)
    ds = pipeline.DistortedMNIST(_config(rotation_deg=0.0), seed=0)
    test = ds.test_set  # 24 digits: chunks 10 + 10 + 4 (padded to 10)
    bundled = mnist.load_mnist(source="bundled")
    subset = np.sort(np.random.default_rng(0).permutation(1000)[:24])
    np.testing.assert_allclose(
        test["image"][..., 0], bundled.test_images[subset] / 255.0, atol=1e-5
    )


@pytest.mark.parametrize("combine", ["add", "max"])
def test_tc_batches_take_clutter_from_other_digits(monkeypatch, combine):
    ds = pipeline.DistortedMNIST(_config("TC", num_train=8, clutter_combine=combine), seed=0)
    calls = []
    real = ds._generator

    def spy(key, digits, sources, **kwargs):
        calls.append((np.asarray(digits), np.asarray(sources), kwargs))
        return real(key, digits, sources, **kwargs)

    monkeypatch.setattr(ds, "_generator", spy)
    batch = ds.train_batch(0, 8)
    assert batch["image"].shape == (8, 60, 60, 1) and ds.image_shape == (60, 60, 1)
    digits, sources, kwargs = calls[0]
    assert sources.shape == (8, 6, 28, 28, 1)
    assert kwargs == {"canvas": 60, "clutter_size": 6, "scale_min": 1.0, "scale_max": 1.0,
                      "combine": combine}
    for b in range(8):
        for k in range(6):
            assert not np.array_equal(sources[b, k], digits[b])
    # The digit is pasted whole: its ink is all there, plus clutter.
    ink = batch["image"].sum(axis=(1, 2, 3))
    assert np.all(ink >= digits.sum(axis=(1, 2, 3)) - 1e-3)


@pytest.mark.parametrize("distortion, canvas", [("RTS", 42), ("P", 28), ("E", 28)])
def test_each_distortion_runs_through_the_pipeline(distortion, canvas):
    ds = pipeline.DistortedMNIST(_config(distortion), seed=0)
    batch = ds.train_batch(0, 16)
    assert batch["image"].shape == (16, canvas, canvas, 1)
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    ink = batch["image"].sum(axis=(1, 2, 3))
    # P with 5 px corner noise squeezes a few digits hard (about 6% keep < 25% of their ink).
    assert np.median(ink) > 20.0 and np.all(ink > 1.0)


@pytest.mark.parametrize(
    "distortion,settings",
    [
        ("RTS", {"canvas": 36, "rotation_deg": 10.0, "scale_min": 0.8, "scale_max": 0.9}),
        ("P", {"canvas": 32, "scale_min": 0.6, "scale_max": 0.7, "corner_std_px": 2.0}),
        ("E", {"canvas": 30, "scale_min": 0.6, "scale_max": 0.7, "control_std_px": 0.5,
               "control_grid_size": 3}),
    ],
)
def test_non_default_settings_reach_the_generator(monkeypatch, distortion, settings):
    # Every field a config sets is what the generator gets, and what it draws lies in the
    # configured ranges (defaults would not: RTS rotates +-45 degrees at scale 0.7-1.2, P and E
    # scale 0.75-1.0).
    ds = pipeline.DistortedMNIST(_config(distortion, **settings), seed=0)
    calls = []
    real = ds._generator

    def spy(key, digits, **kwargs):
        images, params = real(key, digits, **kwargs)
        calls.append((kwargs, {k: np.asarray(v) for k, v in params.items()}))
        return images, params

    monkeypatch.setattr(ds, "_generator", spy)
    batch = ds.train_batch(0, 16)
    canvas = settings["canvas"]
    assert batch["image"].shape == (16, canvas, canvas, 1) and ds.image_shape == (canvas, canvas, 1)
    (kwargs, params), = calls
    assert kwargs == settings
    lo, hi = settings["scale_min"], settings["scale_max"]
    assert np.all((params["scale"] >= lo - 1e-6) & (params["scale"] <= hi + 1e-6)), params["scale"]
    assert params["scale"].std() > 0.01  # drawn, not fixed
    if distortion == "RTS":
        assert np.abs(params["angle_deg"]).max() <= 10.0 + 1e-4
        assert np.abs(params["angle_deg"]).max() > 3.0
    if distortion == "E":
        assert params["control_points_px"].shape == (16, 9, 2)  # a 3 x 3 lattice
