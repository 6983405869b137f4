"""Data: MNIST sources, the distorted-MNIST generators and the training pipeline."""

from stn_jax.data.mnist import MnistArrays, load_mnist
