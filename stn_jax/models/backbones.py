"""ImageNet backbones for the CUB experiment, in flax.nnx, and their weight converters.

- `BNInception`: Inception with batch normalisation (Ioffe & Szegedy 2015), the paper's
  backbone [P], in the layout of the Caffe model ported to PyTorch as `bninception` in Cadene's
  pretrained-models.pytorch (layer names, channel counts, ceil-mode pools, a max pool in
  inception_5b). Input: BGR, 0-255, minus [104, 117, 128], no std. Every conv has a bias and is
  followed by batch norm (eps 1e-5) and ReLU.
- `SqueezeNet11`: SqueezeNet v1.1 without its classifier, in the layout of the Keras HDF5
  weights (`squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5`). Input: BGR, 0-255, minus
  [103.939, 116.779, 123.68], no std. It has no batch norm (the weights were trained without).

Both take RGB images with values 0-255 (uint8 or float) and apply their own input convention
(`preprocess`), so a caller never has to know it. `features(x)` is the last feature map
(B, h, w, C) (the localisation net of the CUB model starts there), `__call__(x)` its global
average (B, C), or ImageNet logits when built with `num_classes`.

Batch norm is `nnx.BatchNorm` (flax's momentum 0.9 = torch's 0.1); its running statistics are
`nnx.BatchStat` variables, used in `model.eval()` and updated in `model.train()`.

Weights (`load_pretrained`): `config.model.weights` (a path), else the cache directory
(`$STN_JAX_WEIGHTS_DIR`, default `~/.cache/stn_jax/weights`), else a download with a checksum
when `download=True`; without a network the error says where to put the file.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stn_jax.models.layers import conv_general_dilated

BACKBONES = ("bn_inception", "squeezenet1_1")

# Input conventions: the channel order the weights expect, the range, the mean subtracted and
# the std divided (as Cadene's `pretrained_settings` and the Keras SqueezeNet code state them).
INPUT_CONVENTIONS = {
    "bn_inception": {"order": "BGR", "range": 255.0, "mean": (104.0, 117.0, 128.0),
                     "std": (1.0, 1.0, 1.0)},
    "squeezenet1_1": {"order": "BGR", "range": 255.0, "mean": (103.939, 116.779, 123.68),
                      "std": (1.0, 1.0, 1.0)},
}

# Where the weights are published, their file names in the cache, and their checksums.
WEIGHTS = {
    "squeezenet1_1": {
        "file": "squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "url": "https://github.com/rcmalli/keras-squeezenet/releases/download/v1.0/"
               "squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "md5": "80b66c92d79d4310e07fb60a297bf0d1",  # What the Keras SqueezeNet code checks.
    },
    "bn_inception": {
        "file": "bn_inception-52deb4733.pth",
        "url": "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth",
        # torch.hub's convention: the name holds a prefix of the file's sha256.
        "sha256_prefix": "52deb4733",
    },
}


def preprocess(images: jax.Array, backbone: str) -> jax.Array:
    """RGB 0-255 images (B, H, W, 3) -> the backbone's input convention (float32).

    Example:
        >>> preprocess(jnp.array([[[[255.0, 0.0, 0.0]]]]), "bn_inception")[0, 0, 0].tolist()
        [-104.0, -117.0, 127.0]
    """
    conv = INPUT_CONVENTIONS[backbone]
    x = jnp.asarray(images, jnp.float32) * (conv["range"] / 255.0)
    if conv["order"] == "BGR":
        x = x[..., ::-1]
    return (x - jnp.asarray(conv["mean"], jnp.float32)) / jnp.asarray(conv["std"], jnp.float32)


# ---------------------------------------------------------------------------- shared layers


def _pool_pads(size: int, k: int, s: int, p: int, ceil: bool) -> tuple[int, int]:
    """(before, after) padding of a pool as torch computes its output size."""
    if ceil:
        out = -(-(size + 2 * p - k) // s) + 1
        if (out - 1) * s >= size + p:  # torch: the last window must start inside the input
            out -= 1
    else:
        out = (size + 2 * p - k) // s + 1
    return p, max(0, (out - 1) * s + k - size - p)


def max_pool(x: jax.Array, k: int, s: int, *, padding: int = 0, ceil: bool = False):
    """k x k max pool, stride s, NHWC, torch's output size (`ceil_mode`), padding never wins."""
    pads = [(0, 0), _pool_pads(x.shape[1], k, s, padding, ceil),
            _pool_pads(x.shape[2], k, s, padding, ceil), (0, 0)]
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1), pads)


def avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    """3 x 3 average pool, stride 1, zero padding 1 counted (torch `count_include_pad=True`)."""
    pads = [(0, 0), (1, 1), (1, 1), (0, 0)]
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads) / 9.0


def _conv(n_in, n_out, k, *, stride=1, padding=0, rngs):
    return nnx.Conv(n_in, n_out, (k, k), strides=(stride, stride),
                    padding=((padding, padding), (padding, padding)),
                    conv_general_dilated=conv_general_dilated, rngs=rngs)


class ConvBN(nnx.Module):
    """conv (with bias, as the Caffe model) -> batch norm -> ReLU."""

    def __init__(self, n_in: int, n_out: int, k: int, *, stride: int = 1, padding: int = 0,
                 rngs: nnx.Rngs):
        self.conv = _conv(n_in, n_out, k, stride=stride, padding=padding, rngs=rngs)
        self.bn = nnx.BatchNorm(n_out, momentum=0.9, epsilon=1e-5, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


# ---------------------------------------------------------------------------- BN-Inception

# (block, in, 1x1, 3x3_reduce, 3x3, double_3x3_reduce, double_3x3, pool, pool_proj, stride);
# 0 = no such branch. Cadene's layout of the Caffe BN-Inception; the concat order is
# [1x1, 3x3, double_3x3, pool(_proj)].
INCEPTION_BLOCKS = (
    ("3a", 192, 64, 64, 64, 64, 96, "avg", 32, 1),
    ("3b", 256, 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 320, 0, 128, 160, 64, 96, "max", 0, 2),
    ("4a", 576, 224, 64, 96, 96, 128, "avg", 128, 1),
    ("4b", 576, 192, 96, 128, 96, 128, "avg", 128, 1),
    ("4c", 576, 160, 128, 160, 128, 160, "avg", 128, 1),
    ("4d", 608, 96, 128, 192, 160, 192, "avg", 128, 1),
    ("4e", 608, 0, 128, 192, 192, 256, "max", 0, 2),
    ("5a", 1056, 352, 192, 320, 160, 224, "avg", 128, 1),
    ("5b", 1024, 352, 192, 320, 192, 224, "max", 128, 1),
)


class InceptionBlock(nnx.Module):
    """One BN-Inception block; attribute names are Cadene's without the `inception_3a_` prefix."""

    def __init__(self, spec, *, rngs: nnx.Rngs):
        _, n_in, c1, c3r, c3, cdr, cd, pool, proj, stride = spec
        self.pool_kind, self.stride = pool, stride
        p = 1
        self.b_1x1 = ConvBN(n_in, c1, 1, rngs=rngs) if c1 else None
        self.b_3x3_reduce = ConvBN(n_in, c3r, 1, rngs=rngs)
        self.b_3x3 = ConvBN(c3r, c3, 3, stride=stride, padding=p, rngs=rngs)
        self.b_double_3x3_reduce = ConvBN(n_in, cdr, 1, rngs=rngs)
        self.b_double_3x3_1 = ConvBN(cdr, cd, 3, padding=p, rngs=rngs)
        self.b_double_3x3_2 = ConvBN(cd, cd, 3, stride=stride, padding=p, rngs=rngs)
        self.b_pool_proj = ConvBN(n_in, proj, 1, rngs=rngs) if proj else None
        self.num_out = c1 + c3 + cd + (proj if proj else n_in)

    def __call__(self, x):
        outs = [] if self.b_1x1 is None else [self.b_1x1(x)]
        outs.append(self.b_3x3(self.b_3x3_reduce(x)))
        outs.append(self.b_double_3x3_2(self.b_double_3x3_1(self.b_double_3x3_reduce(x))))
        if self.stride == 2:
            pooled = max_pool(x, 3, 2, ceil=True)
        elif self.pool_kind == "max":
            pooled = max_pool(x, 3, 1, padding=1, ceil=True)
        else:
            pooled = avg_pool_3x3_same(x)
        outs.append(pooled if self.b_pool_proj is None else self.b_pool_proj(pooled))
        return jnp.concatenate(outs, axis=-1)


class BNInception(nnx.Module):
    """BN-Inception (Cadene's `bninception` layout). 1024 features; ImageNet head optional.

    Args:
        num_classes: None (features only) or the width of `last_linear` (1000 for ImageNet).
        num_blocks: inception blocks kept, 10 (all, to 5b) by default; fewer make a smaller
            net of the same layers (tests of training with batch norm compile it in seconds).
        rngs: initialisation.

    Example:
        >>> net = BNInception(rngs=nnx.Rngs(0))
        >>> net.features(jnp.zeros((1, 224, 224, 3))).shape
        (1, 7, 7, 1024)
    """

    name = "bn_inception"
    num_features = 1024

    def __init__(self, *, num_classes: int | None = None, num_blocks: int = 10,
                 rngs: nnx.Rngs):
        if not isinstance(num_blocks, int) or not 1 <= num_blocks <= len(INCEPTION_BLOCKS):
            raise ValueError(f"num_blocks must be an int in 1..{len(INCEPTION_BLOCKS)}, "
                             f"got {num_blocks!r}")
        self.conv1_7x7_s2 = ConvBN(3, 64, 7, stride=2, padding=3, rngs=rngs)
        self.conv2_3x3_reduce = ConvBN(64, 64, 1, rngs=rngs)
        self.conv2_3x3 = ConvBN(64, 192, 3, padding=1, rngs=rngs)
        self.blocks = nnx.List([InceptionBlock(spec, rngs=rngs)
                                for spec in INCEPTION_BLOCKS[:num_blocks]])
        self.num_features = self.blocks[-1].num_out
        self.last_linear = (None if num_classes is None
                            else nnx.Linear(self.num_features, num_classes, rngs=rngs))

    def features(self, images: jax.Array) -> jax.Array:
        """RGB 0-255 (B, H, W, 3) -> inception_5b output (B, ~H/32, ~W/32, 1024)."""
        x = preprocess(images, self.name)
        x = max_pool(self.conv1_7x7_s2(x), 3, 2, ceil=True)
        x = max_pool(self.conv2_3x3(self.conv2_3x3_reduce(x)), 3, 2, ceil=True)
        for block in self.blocks:
            x = block(x)
        return x

    def __call__(self, images: jax.Array) -> jax.Array:
        """Globally averaged features (B, 1024), or logits (B, num_classes) with a head."""
        pooled = self.features(images).mean(axis=(1, 2))
        return pooled if self.last_linear is None else self.last_linear(pooled)


def _bninception_layers(model: BNInception):
    """(torch name, ConvBN) of every conv unit, in Cadene's names."""
    yield "conv1_7x7_s2", model.conv1_7x7_s2
    yield "conv2_3x3_reduce", model.conv2_3x3_reduce
    yield "conv2_3x3", model.conv2_3x3
    for spec, block in zip(INCEPTION_BLOCKS, model.blocks):
        for branch in ("1x1", "3x3_reduce", "3x3", "double_3x3_reduce", "double_3x3_1",
                       "double_3x3_2", "pool_proj"):
            unit = getattr(block, f"b_{branch}")
            if unit is not None:
                yield f"inception_{spec[0]}_{branch}", unit


def _take(state: Mapping[str, Any], key: str, shape: tuple[int, ...], used: set) -> np.ndarray:
    if key not in state:
        raise KeyError(f"state_dict has no {key!r}")
    value = np.asarray(state[key], np.float32)
    if value.size != int(np.prod(shape)):
        raise ValueError(f"state_dict[{key!r}] has shape {value.shape}, expected {shape}")
    used.add(key)
    return value


def load_bninception_state_dict(model: BNInception, state_dict: Mapping[str, Any]) -> None:
    """Copies a Cadene `bninception` state_dict (torch tensors or numpy arrays) into `model`.

    Conv kernels go from torch's (O, I, kh, kw) to (kh, kw, I, O); batch norm's weight, bias,
    running_mean and running_var (any shape holding C values, e.g. the (1, C) of some ports)
    to scale, bias, mean and var. `last_linear` (or `fc`) is copied when the model has a head.

    Raises:
        KeyError: a layer of the model is missing from the state_dict (named).
        ValueError: a shape differs (named), or the state_dict has keys the model does not use.
    """
    state = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v)
             for k, v in state_dict.items()}
    used: set = set()
    for name, unit in _bninception_layers(model):
        kernel = unit.conv.kernel
        kh, kw, n_in, n_out = kernel.shape
        w = _take(state, f"{name}.weight", (n_out, n_in, kh, kw), used).reshape(n_out, n_in, kh, kw)
        kernel[...] = jnp.asarray(w.transpose(2, 3, 1, 0))
        unit.conv.bias[...] = jnp.asarray(_take(state, f"{name}.bias", (n_out,), used).ravel())
        for torch_key, var in (("weight", unit.bn.scale), ("bias", unit.bn.bias),
                               ("running_mean", unit.bn.mean), ("running_var", unit.bn.var)):
            var[...] = jnp.asarray(_take(state, f"{name}_bn.{torch_key}", (n_out,), used).ravel())
        used.add(f"{name}_bn.num_batches_tracked")
    head_names = [p for p in ("last_linear", "fc") if f"{p}.weight" in state]
    if model.last_linear is not None:
        if not head_names:
            raise KeyError("state_dict has no 'last_linear.weight' (or 'fc.weight')")
        n_in, n_out = model.last_linear.kernel.shape
        w = _take(state, f"{head_names[0]}.weight", (n_out, n_in), used).reshape(n_out, n_in)
        model.last_linear.kernel[...] = jnp.asarray(w.T)
        model.last_linear.bias[...] = jnp.asarray(
            _take(state, f"{head_names[0]}.bias", (n_out,), used).ravel())
    else:
        used.update(k for k in state if k.split(".")[0] in ("last_linear", "fc"))
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"state_dict keys the BN-Inception layout does not have: {unused[:5]}")


# ---------------------------------------------------------------------------- SqueezeNet v1.1

FIRES = (  # (name, in, squeeze, expand each); max pools after conv1, fire3 and fire5.
    ("fire2", 64, 16, 64), ("fire3", 128, 16, 64), ("fire4", 128, 32, 128),
    ("fire5", 256, 32, 128), ("fire6", 256, 48, 192), ("fire7", 384, 48, 192),
    ("fire8", 384, 64, 256), ("fire9", 512, 64, 256),
)
_POOL_AFTER = ("fire3", "fire5")


class Fire(nnx.Module):
    """squeeze 1x1 -> ReLU -> [expand1x1, expand3x3 (same padding)] -> ReLU, concatenated."""

    def __init__(self, n_in: int, squeeze: int, expand: int, *, rngs: nnx.Rngs):
        self.squeeze1x1 = _conv(n_in, squeeze, 1, rngs=rngs)
        self.expand1x1 = _conv(squeeze, expand, 1, rngs=rngs)
        self.expand3x3 = _conv(squeeze, expand, 3, padding=1, rngs=rngs)

    def __call__(self, x):
        s = jax.nn.relu(self.squeeze1x1(x))
        return jnp.concatenate(
            [jax.nn.relu(self.expand1x1(s)), jax.nn.relu(self.expand3x3(s))], axis=-1)


class SqueezeNet11(nnx.Module):
    """SqueezeNet v1.1 features (Keras layout, no classifier): 512 channels.

    conv1 3x3 stride 2 (no padding) -> ReLU -> max-pool 3/2 -> fire2, fire3 -> max-pool ->
    fire4, fire5 -> max-pool -> fire6 ... fire9. Pools are Keras's "valid" (floor).

    Example:
        >>> net = SqueezeNet11(rngs=nnx.Rngs(0))
        >>> net.features(jnp.zeros((1, 224, 224, 3))).shape
        (1, 13, 13, 512)
    """

    name = "squeezenet1_1"
    num_features = 512

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 64, (3, 3), strides=(2, 2), padding="VALID", rngs=rngs)
        self.fires = nnx.List([Fire(n_in, s, e, rngs=rngs) for _, n_in, s, e in FIRES])

    def features(self, images: jax.Array) -> jax.Array:
        """RGB 0-255 (B, H, W, 3) -> fire9 output (B, h, w, 512)."""
        x = max_pool(jax.nn.relu(self.conv1(preprocess(images, self.name))), 3, 2)
        for (name, *_), fire in zip(FIRES, self.fires):
            x = fire(x)
            if name in _POOL_AFTER:
                x = max_pool(x, 3, 2)
        return x

    def __call__(self, images: jax.Array) -> jax.Array:
        """Globally averaged fire9 features (B, 512)."""
        return self.features(images).mean(axis=(1, 2))


def squeezenet_keras_weights(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{layer: (kernel (kh, kw, in, out), bias)} from the Keras HDF5 file (layer `weight_names`).

    Raises:
        ValueError: the file lacks a layer of SqueezeNet v1.1 (named) or a layer has no kernel
            and bias.
    """
    import h5py

    wanted = ["conv1"] + [f"{f}/{c}" for f, *_ in FIRES
                          for c in ("squeeze1x1", "expand1x1", "expand3x3")]
    out = {}
    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        for name in wanted:
            if name not in group:
                raise ValueError(f"{path}: no layer {name!r} (not SqueezeNet v1.1 Keras weights)")
            layer = group[name]
            names = [n.decode() if isinstance(n, bytes) else n
                     for n in layer.attrs["weight_names"]]
            if len(names) != 2:
                raise ValueError(f"{path}: layer {name!r} has weights {names}, expected 2")
            out[name] = (np.asarray(layer[names[0]], np.float32),
                         np.asarray(layer[names[1]], np.float32))
    return out


def load_squeezenet_keras(model: SqueezeNet11, path: str) -> None:
    """Copies the Keras HDF5 SqueezeNet v1.1 weights at `path` into `model` (shapes checked)."""
    weights = squeezenet_keras_weights(path)
    targets = {"conv1": model.conv1}
    for (name, *_), fire in zip(FIRES, model.fires):
        for conv in ("squeeze1x1", "expand1x1", "expand3x3"):
            targets[f"{name}/{conv}"] = getattr(fire, conv)
    for name, conv in targets.items():
        kernel, bias = weights[name]
        if kernel.shape != conv.kernel.shape or bias.shape != conv.bias.shape:
            raise ValueError(f"{path}: layer {name!r} has shapes {kernel.shape}, {bias.shape}; "
                             f"expected {conv.kernel.shape}, {conv.bias.shape}")
        conv.kernel[...] = jnp.asarray(kernel)
        conv.bias[...] = jnp.asarray(bias)


# ---------------------------------------------------------------------------- weights


def host_init(make, *, seed: int = 0) -> nnx.Module:
    """Builds the module `make()` with numpy-drawn weights, compiling nothing.

    Drawing a 10M-parameter net's initial weights with jax compiles one random-number program
    per shape (minutes on a busy 2-core CPU for BN-Inception); pretrained weights replace them
    anyway. Kernels: LeCun normal (std sqrt(1 / fan_in), as flax's default), biases 0, batch
    norm scale 1, bias 0, mean 0, var 1.

    Example:
        >>> net = host_init(lambda: SqueezeNet11(rngs=nnx.Rngs(0)))
        >>> float(net.fires[0].squeeze1x1.bias[...].sum())
        0.0
    """
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-2].key if isinstance(path[-1], jax.tree_util.GetAttrKey) else path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
        elif name in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def create_backbone(name: str, *, seed: int = 0) -> nnx.Module:
    """A backbone, "bn_inception" | "squeezenet1_1", with host-drawn random weights."""
    if name == "bn_inception":
        return host_init(lambda: BNInception(rngs=nnx.Rngs(0)), seed=seed)
    if name == "squeezenet1_1":
        return host_init(lambda: SqueezeNet11(rngs=nnx.Rngs(0)), seed=seed)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")


def cache_dir() -> str:
    """Where pretrained weights are looked for and downloaded to."""
    return os.environ.get("STN_JAX_WEIGHTS_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "stn_jax", "weights"))


def _check_file(path: str, info: dict) -> None:
    data = open(path, "rb").read()
    if "md5" in info and hashlib.md5(data).hexdigest() != info["md5"]:
        raise ValueError(f"{path}: md5 {hashlib.md5(data).hexdigest()} != {info['md5']}")
    if "sha256_prefix" in info and not hashlib.sha256(data).hexdigest().startswith(
            info["sha256_prefix"]):
        raise ValueError(f"{path}: sha256 does not start with {info['sha256_prefix']}")


def weights_path(name: str, *, path: str = "", download: bool = False) -> str:
    """The weights file of backbone `name`: `path` if given, else the cache's, else downloaded.

    Raises:
        FileNotFoundError: not found (and not downloadable): says where to put the file.
        ValueError: a downloaded file fails its checksum.
    """
    if name not in WEIGHTS:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    info = WEIGHTS[name]
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.weights={path!r} does not exist (the {name} "
                                    f"weights: {info['url']})")
        return path
    cached = os.path.join(cache_dir(), info["file"])
    if os.path.isfile(cached):
        return cached
    hint = (f"no {name} weights: download {info['url']} and put it at {cached} (or set "
            f"$STN_JAX_WEIGHTS_DIR, or pass --config.model.weights=PATH)")
    if not download:
        raise FileNotFoundError(hint)
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = cached + ".part"
    try:
        urllib.request.urlretrieve(info["url"], tmp)
    except OSError as e:
        raise FileNotFoundError(f"{hint}; the download failed: {e}") from e
    _check_file(tmp, info)
    os.replace(tmp, cached)
    return cached


def load_pretrained(model: nnx.Module, *, path: str = "", download: bool = False) -> str:
    """Fills `model` (a BNInception or SqueezeNet11) with its ImageNet weights; returns the file.

    BN-Inception reads Cadene's `.pth` (needs torch) or a `.npz` of the same state_dict
    (`scripts/convert_bninception.py` writes one, so torch is needed once); SqueezeNet reads the
    Keras `.h5`.
    """
    file = weights_path(model.name, path=path, download=download)
    if isinstance(model, SqueezeNet11):
        load_squeezenet_keras(model, file)
    elif file.endswith(".npz"):
        with np.load(file) as z:
            load_bninception_state_dict(model, dict(z))
    else:
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {file} needs torch; or convert it once to .npz with "
                              "scripts/convert_bninception.py") from e
        load_bninception_state_dict(model, torch.load(file, map_location="cpu",
                                                      weights_only=True))
    return file
