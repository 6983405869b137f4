"""Data: MNIST sources, the distorted-MNIST generators and the training pipeline."""

from stn_jax.data.distortions import (
    DISTORTIONS,
    affine_warp,
    cluttered,
    distortion_fn,
    elastic,
    homography_from_points,
    projective,
    rotate,
    rotate_translate_scale,
)
from stn_jax.data.mnist import MnistArrays, load_mnist
from stn_jax.data.pipeline import DATA_FIELDS, DistortedMNIST, default_data_config
