"""Backbones: BN-Inception and SqueezeNet v1.1 against PyTorch forwards with the same weights."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from flax import nnx
import jax.numpy as jnp

from stn_jax.models import backbones as B
from stn_jax.models import count_params

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

ROOT = pathlib.Path(__file__).resolve().parents[1]
SQUEEZENET_H5 = (ROOT.parent / "shared" / "data" / "weights"
                 / "squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5")


def _images(seed: int, n: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def _bgr_minus(images: np.ndarray, mean) -> torch.Tensor:
    """The convention written out by hand: RGB 0-255 -> BGR minus the mean, NCHW for torch."""
    bgr = images[..., ::-1] - np.asarray(mean, np.float32)
    return torch.from_numpy(np.ascontiguousarray(bgr.transpose(0, 3, 1, 2)))


# ------------------------------------------------------------------ BN-Inception in PyTorch
# Written from the Caffe BN-Inception layout as Cadene's `bninception` ports it: conv (bias) ->
# BatchNorm2d -> ReLU units named <layer> / <layer>_bn, ceil-mode max pools, 3x3 average pools
# with count_include_pad, a max pool in inception_5b, concat [1x1, 3x3, double_3x3, pool_proj].

BLOCKS = [  # name, in, 1x1, 3x3red, 3x3, dbl red, dbl, pool, proj, stride
    ("3a", 192, 64, 64, 64, 64, 96, "avg", 32, 1), ("3b", 256, 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 320, 0, 128, 160, 64, 96, "max", 0, 2), ("4a", 576, 224, 64, 96, 96, 128, "avg", 128, 1),
    ("4b", 576, 192, 96, 128, 96, 128, "avg", 128, 1),
    ("4c", 576, 160, 128, 160, 128, 160, "avg", 128, 1),
    ("4d", 608, 96, 128, 192, 160, 192, "avg", 128, 1), ("4e", 608, 0, 128, 192, 192, 256, "max", 0, 2),
    ("5a", 1056, 352, 192, 320, 160, 224, "avg", 128, 1),
    ("5b", 1024, 352, 192, 320, 192, 224, "max", 128, 1),
]


class TorchBNInception(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.units = []

        def unit(name, n_in, n_out, k, stride=1, pad=0):
            setattr(self, name, nn.Conv2d(n_in, n_out, k, stride=stride, padding=pad))
            setattr(self, name + "_bn", nn.BatchNorm2d(n_out, eps=1e-5, affine=True))
            return name

        self.stem = [unit("conv1_7x7_s2", 3, 64, 7, 2, 3), "pool",
                     unit("conv2_3x3_reduce", 64, 64, 1), unit("conv2_3x3", 64, 192, 3, 1, 1),
                     "pool"]
        self.blocks = []
        for b, n_in, c1, c3r, c3, cdr, cd, pool, proj, s in BLOCKS:
            p = f"inception_{b}_"
            self.blocks.append(dict(
                one=unit(p + "1x1", n_in, c1, 1) if c1 else None,
                three=[unit(p + "3x3_reduce", n_in, c3r, 1), unit(p + "3x3", c3r, c3, 3, s, 1)],
                double=[unit(p + "double_3x3_reduce", n_in, cdr, 1),
                        unit(p + "double_3x3_1", cdr, cd, 3, 1, 1),
                        unit(p + "double_3x3_2", cd, cd, 3, s, 1)],
                pool=pool, stride=s, proj=unit(p + "pool_proj", n_in, proj, 1) if proj else None))
        self.last_linear = nn.Linear(1024, num_classes)

    def run(self, name, x):
        return F.relu(getattr(self, name + "_bn")(getattr(self, name)(x)))

    def forward(self, x):
        for name in self.stem:
            x = F.max_pool2d(x, 3, 2, ceil_mode=True) if name == "pool" else self.run(name, x)
        for blk in self.blocks:
            outs = [] if blk["one"] is None else [self.run(blk["one"], x)]
            t = x
            for name in blk["three"]:
                t = self.run(name, t)
            outs.append(t)
            t = x
            for name in blk["double"]:
                t = self.run(name, t)
            outs.append(t)
            if blk["stride"] == 2:
                t = F.max_pool2d(x, 3, 2, ceil_mode=True)
            elif blk["pool"] == "max":
                t = F.max_pool2d(x, 3, 1, padding=1, ceil_mode=True)
            else:
                t = F.avg_pool2d(x, 3, 1, padding=1, ceil_mode=True, count_include_pad=True)
            outs.append(t if blk["proj"] is None else self.run(blk["proj"], t))
            x = torch.cat(outs, 1)
        # Cadene: AvgPool2d(7) on the 7x7 map of a 224 input, i.e. the global average.
        return self.last_linear(x.mean(dim=(2, 3)))


def _randomised_torch_bninception(seed: int) -> TorchBNInception:
    torch.manual_seed(seed)
    net = TorchBNInception()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics and affine away from 0/1
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.eval()


def test_bninception_converter_matches_torch_in_eval_mode():
    tnet = _randomised_torch_bninception(0)
    state_dict = tnet.state_dict()
    assert "inception_5b_pool_proj_bn.running_var" in state_dict
    model = B.host_init(lambda: B.BNInception(num_classes=1000, rngs=nnx.Rngs(0)), seed=5)
    B.load_bninception_state_dict(model, state_dict)
    assert count_params(model) == sum(
        p.numel() for k, p in state_dict.items() if "running" not in k and "num_batches" not in k)
    images = _images(1, 2, 64)  # 64 px: ceil-mode pools on odd maps (32 -> 16 -> 8 -> 4 -> 2)
    model.eval()
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images)))
    with torch.no_grad():
        ref = tnet(_bgr_minus(images, (104.0, 117.0, 128.0))).numpy()
    assert ours.shape == (2, 1000)
    scale = np.abs(ref).max()
    assert scale > 0.1  # not a degenerate net
    np.testing.assert_allclose(ours, ref, atol=1e-4 * scale, rtol=0)


def test_bninception_converter_rejects_wrong_state_dicts():
    model = B.host_init(lambda: B.BNInception(rngs=nnx.Rngs(0)))
    sd = {k: v.numpy() for k, v in TorchBNInception(num_classes=10).state_dict().items()}
    B.load_bninception_state_dict(model, sd)  # no head in the model: last_linear ignored
    bad = dict(sd)
    del bad["inception_4c_3x3_bn.running_mean"]
    with pytest.raises(KeyError, match="inception_4c_3x3_bn.running_mean"):
        B.load_bninception_state_dict(model, bad)
    bad = dict(sd, **{"inception_3a_1x1.weight": np.zeros((64, 192, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"inception_3a_1x1.weight.*expected \(64, 192, 1, 1\)"):
        B.load_bninception_state_dict(model, bad)
    with pytest.raises(ValueError, match="does not have: \\['extra.weight'\\]"):
        B.load_bninception_state_dict(model, dict(sd, **{"extra.weight": np.zeros(1)}))


def test_batch_norm_train_mode_uses_batch_statistics_and_updates_running_ones():
    unit = B.host_init(lambda: B.ConvBN(3, 4, 1, rngs=nnx.Rngs(0)), seed=2)
    x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (8, 5, 5, 3)), jnp.float32)
    unit.train()
    y = unit(x)
    conv = np.asarray(unit.conv(x))
    want = np.maximum((conv - conv.mean((0, 1, 2))) / np.sqrt(conv.var((0, 1, 2)) + 1e-5), 0)
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-4)
    # momentum 0.9 (torch's 0.1): running mean = 0.1 * batch mean after one step from 0
    np.testing.assert_allclose(np.asarray(unit.bn.mean[...]), 0.1 * conv.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    unit.eval()
    y_eval = np.asarray(unit(x))
    want_eval = np.maximum((conv - np.asarray(unit.bn.mean[...]))
                           / np.sqrt(np.asarray(unit.bn.var[...]) + 1e-5), 0)
    np.testing.assert_allclose(y_eval, want_eval, atol=1e-4)


# ------------------------------------------------------------------ SqueezeNet v1.1


class TorchSqueezeNet11(nn.Module):
    """SqueezeNet v1.1 features as the Keras model: valid conv1 and floor-mode pools."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2)
        self.fires = nn.ModuleList()
        for _, n_in, s, e in B.FIRES:
            self.fires.append(nn.ModuleDict(dict(
                squeeze1x1=nn.Conv2d(n_in, s, 1), expand1x1=nn.Conv2d(s, e, 1),
                expand3x3=nn.Conv2d(s, e, 3, padding=1))))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 3, 2)
        for i, f in enumerate(self.fires):
            s = F.relu(f["squeeze1x1"](x))
            x = torch.cat([F.relu(f["expand1x1"](s)), F.relu(f["expand3x3"](s))], 1)
            if i in (1, 3):  # after fire3 and fire5
                x = F.max_pool2d(x, 3, 2)
        return x


def _torch_squeezenet_from_h5(path) -> TorchSqueezeNet11:
    """Loads the Keras file by hand with h5py (its own reading, not the converter's)."""
    import h5py

    net = TorchSqueezeNet11()
    with h5py.File(path, "r") as f, torch.no_grad():
        def put(conv, layer):
            names = list(f[layer].attrs["weight_names"])
            kernel, bias = (np.asarray(f[layer][n]) for n in names)
            conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(bias))
        put(net.conv1, "conv1")
        for (name, *_), fire in zip(B.FIRES, net.fires):
            for c in ("squeeze1x1", "expand1x1", "expand3x3"):
                put(fire[c], f"{name}/{c}")
    return net.eval()


def _write_random_keras_h5(path, seed: int) -> None:
    """A file in the layout of the Keras SqueezeNet weights (Keras 1 weight_names)."""
    import h5py

    rng = np.random.default_rng(seed)
    layers = [("conv1", 3, 3, 64)] + [
        (f"{name}/{c}", k, n_in_c, out)
        for name, n_in, s, e in B.FIRES
        for c, k, n_in_c, out in (("squeeze1x1", 1, n_in, s), ("expand1x1", 1, s, e),
                                  ("expand3x3", 3, s, e))]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n, *_ in layers])
        for i, (name, k, n_in, out) in enumerate(layers):
            g = f.create_group(name)
            names = [f"uniform{i}".encode(), f"{name}_b".encode()]
            g.attrs["weight_names"] = np.array(names)
            g[names[0].decode()] = (rng.standard_normal((k, k, n_in, out))
                                    * np.sqrt(2 / (k * k * n_in))).astype(np.float32)
            g[names[1].decode()] = (rng.standard_normal(out) * 0.1).astype(np.float32)


def _check_squeezenet(path, size: int):
    model = B.host_init(lambda: B.SqueezeNet11(rngs=nnx.Rngs(0)))
    B.load_squeezenet_keras(model, str(path))
    assert count_params(model) == 722_496
    images = _images(3, 2, size)
    ours = np.asarray(nnx.jit(lambda m, x: m.features(x))(model, jnp.asarray(images)))
    with torch.no_grad():
        ref = _torch_squeezenet_from_h5(path)(
            _bgr_minus(images, (103.939, 116.779, 123.68))).numpy().transpose(0, 2, 3, 1)
    assert ours.shape == ref.shape
    scale = np.abs(ref).max()
    assert scale > 0.1
    np.testing.assert_allclose(ours, ref, atol=1e-4 * scale, rtol=0)
    return model


def test_squeezenet_converter_matches_torch_on_a_written_keras_file(tmp_path):
    path = tmp_path / "squeezenet.h5"
    _write_random_keras_h5(path, 0)
    model = _check_squeezenet(path, 71)  # odd size: floor pools 35 -> 17 -> 8 -> 3
    assert model.features(jnp.zeros((1, 71, 71, 3))).shape == (1, 3, 3, 512)


@pytest.mark.skipif(not SQUEEZENET_H5.is_file(), reason=f"weights not found at {SQUEEZENET_H5}")
def test_squeezenet_real_weights_match_torch_and_checksum():
    B._check_file(str(SQUEEZENET_H5), B.WEIGHTS["squeezenet1_1"])
    _check_squeezenet(SQUEEZENET_H5, 64)


def test_input_conventions():
    rgb = jnp.array([[[[255.0, 128.0, 0.0]]]])
    np.testing.assert_allclose(B.preprocess(rgb, "bn_inception")[0, 0, 0], [-104, 11, 127])
    np.testing.assert_allclose(B.preprocess(rgb, "squeezenet1_1")[0, 0, 0],
                               [-103.939, 11.221, 131.32], rtol=1e-6)
    # uint8 input gives the same as float.
    u8 = jnp.array([[[[255, 128, 0]]]], jnp.uint8)
    np.testing.assert_array_equal(B.preprocess(u8, "bn_inception"), B.preprocess(rgb, "bn_inception"))


def test_pools_follow_torch_sizes():
    x = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1)
    t = torch.arange(2 * 8 * 8 * 1, dtype=torch.float32).reshape(2, 8, 8, 1).permute(0, 3, 1, 2)
    for k, s, p, ceil in ((3, 2, 0, True), (3, 2, 0, False), (3, 1, 1, True)):
        ours = np.asarray(B.max_pool(x, k, s, padding=p, ceil=ceil))
        ref = F.max_pool2d(t, k, s, padding=p, ceil_mode=ceil).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(ours, ref)
    ref = F.avg_pool2d(t, 3, 1, padding=1, count_include_pad=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(B.avg_pool_3x3_same(x)), ref, rtol=1e-6)


def test_weights_path_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("STN_JAX_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"put it at {tmp_path}/bn_inception-52deb4733"):
        B.weights_path("bn_inception")
    with pytest.raises(FileNotFoundError, match="model.weights='/nope.h5' does not exist"):
        B.weights_path("squeezenet1_1", path="/nope.h5")
    cached = tmp_path / B.WEIGHTS["squeezenet1_1"]["file"]
    cached.write_bytes(b"not weights")
    assert B.weights_path("squeezenet1_1") == str(cached)
    with pytest.raises(ValueError, match="md5"):
        B._check_file(str(cached), B.WEIGHTS["squeezenet1_1"])
