r"""Converts Cadene's BN-Inception `.pth` (pretrained-models.pytorch `bninception`) to `.npz`.

    python scripts/convert_bninception.py bn_inception-52deb4733.pth \
        ~/.cache/stn_jax/weights/bn_inception-52deb4733.npz

The `.npz` holds the same state_dict as numpy arrays, so training reads it without torch
(`--config.model.weights=PATH.npz`). torch is needed for this step only. The file is checked
against the BN-Inception layout (every layer present, every shape right) before it is written.
"""

import argparse

import numpy as np
import torch
from flax import nnx

from stn_jax.models import backbones


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pth")
    parser.add_argument("npz")
    args = parser.parse_args()
    state = torch.load(args.pth, map_location="cpu", weights_only=True)
    arrays = {k: v.detach().cpu().numpy() for k, v in state.items()}
    model = backbones.host_init(lambda: backbones.BNInception(num_classes=1000,
                                                              rngs=nnx.Rngs(0)))
    backbones.load_bninception_state_dict(model, arrays)  # raises on a wrong layout
    np.savez(args.npz, **arrays)
    print(f"wrote {args.npz}: {len(arrays)} arrays")


if __name__ == "__main__":
    main()
