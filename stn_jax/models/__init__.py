"""Model families of the paper's experiments, one file each (mnist.py: Table 1).

Each family has its own factory, e.g. `stn_jax.models.mnist.create_model`; what they share
lives here.
"""

import jax
from flax import nnx


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars (`nnx.Param` leaves) in a model.

    Example:
        >>> count_params(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
        8
    """
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
