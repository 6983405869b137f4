"""scripts/transformer_zoom.py: the affine scale, and its one-line errors on wrong folders."""

import json

import numpy as np
import pytest

import file_modules


@pytest.fixture(scope="module")
def zoom():
    return file_modules.load("scripts/transformer_zoom.py")


def test_affine_scale_hand_computed(zoom):
    theta = np.array([[1, 0, 0, 0, 1, 0],          # identity: the whole input
                      [0.5, 0, 0.3, 0, 0.5, -0.2],  # half the side, shifted
                      [0, -0.8, 0, 0.8, 0, 0],      # rotated by 90 degrees, 0.8 of the side
                      [2, 0, 0, 0, 0.5, 0]])        # stretched: the area's square root
    np.testing.assert_allclose(zoom.affine_scale(theta), [1.0, 0.5, 0.8, 1.0])
    np.testing.assert_allclose(zoom.affine_scale(theta.reshape(-1, 2, 3)), [1.0, 0.5, 0.8, 1.0])


def test_wrong_folders_fail_in_one_line(zoom, tmp_path, capsys):
    assert zoom.main([str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(
        {"task": "mnist", "model": {"name": "cnn", "transform": "affine"}}))
    assert zoom.main([str(tmp_path)]) == 2
    assert "not an MNIST ST run with an affine transformer" in capsys.readouterr().err
