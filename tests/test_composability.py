"""The samplers inside someone else's JAX program, written as a client would use them.

Every method of ``stn_jax.bilinear_sample`` (and ``nearest_sample``) is taken through forward
mode (jvp, jacfwd, linearize), grad of grad, shard_map, meshes with Explicit axes, batch
sharding (the native kernel must run on each device's shard: read from the compiled HLO) and
``jax.export`` (a round trip into a fresh process). Numbers are compared with the gather path
and with finite differences. The multi-device checks run in one subprocess with four host
devices; the export round trip loads in another, which for the portable export never imports
stn_jax.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stn_jax
from stn_jax import _native

NATIVE = _native.available()
METHODS = ["auto", "gather", "native", "separable"]
# The forward-mode and second-order tests take each path once. "auto" is one of the others
# (the native kernel on the CPU, the gather path where it is unavailable): the same JVP and
# transpose rules, so it is left to the tests of its own choice (shard_map, meshes, export).
PATHS = ["gather", "native", "separable"]


def _method(method):
    if method == "native" and not NATIVE:
        pytest.skip(f"native kernels unavailable: {_native.error()}")
    return method


def _inputs(batch=2, hw=(5, 6), out=(4, 3), channels=2, attention=False, seed=0):
    """A random image and a grid whose points sit inside cells (fractional pixel parts in
    [0.2, 0.8]), away from the kinks, so finite differences see one bilinear patch; with
    ``attention`` the grid is axis-aligned (the separable path's own case)."""
    rng = np.random.default_rng(seed)
    h, w = hw
    image = rng.normal(size=(batch, h, w, channels)).astype(np.float32)
    if attention:
        px = np.sort(rng.integers(0, w - 1, out[1]) + rng.uniform(0.2, 0.8, out[1]))
        py = np.sort(rng.integers(0, h - 1, out[0]) + rng.uniform(0.2, 0.8, out[0]))
        px, py = np.broadcast_to(px, out), np.broadcast_to(py[:, None], out)
        px, py = np.broadcast_to(px, (batch,) + out), np.broadcast_to(py, (batch,) + out)
    else:
        px = rng.integers(0, w - 1, (batch,) + out) + rng.uniform(0.2, 0.8, (batch,) + out)
        py = rng.integers(0, h - 1, (batch,) + out) + rng.uniform(0.2, 0.8, (batch,) + out)
    # align_corners=False: x = ((g + 1) W - 1) / 2.
    grid = np.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], -1).astype(np.float32)
    return jnp.asarray(image), jnp.asarray(grid)


def _sampler(method, **kw):
    return lambda i, g: stn_jax.bilinear_sample(i, g, method=method, **kw)


# ---------------------------------------------------------------------------------------------
# Forward mode and second order, every method
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", PATHS)
def test_jvp_matches_gather_and_finite_differences(method):
    f = _sampler(_method(method))
    image, grid = _inputs(attention=method == "separable")
    rng = np.random.default_rng(1)
    t_image = jnp.asarray(rng.normal(size=image.shape).astype(np.float32))
    t_grid = jnp.asarray(rng.normal(size=grid.shape).astype(np.float32)) * 0.05
    if method == "separable":  # an axis-aligned direction keeps the grid separable
        t_grid = jnp.broadcast_to(t_grid[:, :1, :, :1] * jnp.array([1.0, 0.0]), grid.shape) + \
            jnp.broadcast_to(t_grid[:, :, :1, 1:] * jnp.array([0.0, 1.0]), grid.shape)
    out, tangent = jax.jit(lambda i, g, ti, tg: jax.jvp(f, (i, g), (ti, tg)))(
        image, grid, t_image, t_grid)
    _, want = jax.jvp(_sampler("gather"), (image, grid), (t_image, t_grid))
    np.testing.assert_allclose(out, _sampler("gather")(image, grid), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tangent, want, rtol=1e-5, atol=1e-5)
    # Central differences: within one cell the output is quadratic along any line, so the
    # central difference is exact up to float32 rounding.
    eps = 1e-2
    fd = (f(image + eps * t_image, grid + eps * t_grid)
          - f(image - eps * t_image, grid - eps * t_grid)) / (2 * eps)
    np.testing.assert_allclose(tangent, fd, rtol=2e-3, atol=2e-3)
    assert float(jnp.max(jnp.abs(tangent))) > 0.1  # a real, non-zero directional derivative


@pytest.mark.parametrize("method", PATHS)
def test_jacfwd_equals_jacrev_and_linearize_equals_jvp(method):
    f = _sampler(_method(method))
    image, grid = _inputs(batch=1, hw=(4, 5), out=(3, 2), channels=1,
                          attention=method == "separable")
    for argnum in (0, 1):
        fwd = jax.jacfwd(f, argnums=argnum)(image, grid)
        rev = jax.jacrev(f, argnums=argnum)(image, grid)
        ref = jax.jacrev(_sampler("gather"), argnums=argnum)(image, grid)
        np.testing.assert_allclose(fwd, rev, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fwd, ref, rtol=1e-5, atol=1e-6)
        assert float(jnp.max(jnp.abs(fwd))) > 0.1
    out, f_jvp = jax.linearize(f, image, grid)
    t_image, t_grid = jnp.ones_like(image), jnp.full_like(grid, 0.1)
    np.testing.assert_allclose(f_jvp(t_image, t_grid),
                               jax.jvp(f, (image, grid), (t_image, t_grid))[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, f(image, grid), rtol=1e-6)


@pytest.mark.parametrize("method", PATHS)
def test_grad_of_grad_and_hessian_vector_products_match_gather(method):
    f = _sampler(_method(method))
    image, grid = _inputs(attention=method == "separable")

    def loss(fn, i, g):
        return jnp.sum(jnp.sin(fn(i, g)) * fn(i, g))

    def grad_norm(fn, i, g):  # grad of grad: a gradient penalty
        gi, gg = jax.grad(lambda i, g: loss(fn, i, g), argnums=(0, 1))(i, g)
        return jnp.sum(gi**2) + jnp.sum(gg**2)

    got = jax.grad(lambda i, g: grad_norm(f, i, g), argnums=(0, 1))(image, grid)
    want = jax.grad(lambda i, g: grad_norm(_sampler("gather"), i, g), argnums=(0, 1))(image, grid)
    for g_, w_ in zip(got, want):
        np.testing.assert_allclose(g_, w_, rtol=1e-4, atol=1e-4)
    # Forward over reverse (jax.hessian's order) along one direction.
    v = (jnp.ones_like(image), jnp.full_like(grid, 0.03))
    hvp = jax.jvp(jax.grad(lambda i, g: loss(f, i, g), argnums=(0, 1)), (image, grid), v)[1]
    want = jax.jvp(jax.grad(lambda i, g: loss(_sampler("gather"), i, g), argnums=(0, 1)),
                   (image, grid), v)[1]
    for g_, w_ in zip(hvp, want):
        np.testing.assert_allclose(g_, w_, rtol=1e-4, atol=1e-4)


def test_nearest_forward_mode():
    image, grid = _inputs()
    t_image = jnp.cos(image)
    out, tangent = jax.jvp(stn_jax.nearest_sample, (image, grid), (t_image, jnp.ones_like(grid)))
    # Linear in the image; a zero derivative to the grid.
    np.testing.assert_array_equal(tangent, stn_jax.nearest_sample(t_image, grid))
    jac = jax.jacfwd(stn_jax.nearest_sample, argnums=1)(image[:1], grid[:1])
    np.testing.assert_array_equal(jac, 0.0)
    _, f_jvp = jax.linearize(stn_jax.nearest_sample, image, grid)
    np.testing.assert_array_equal(f_jvp(t_image, grid), tangent)


@pytest.mark.parametrize("method", PATHS)
def test_vmap_scan_remat_of_forward_mode(method):
    f = _sampler(_method(method))
    image, grid = _inputs(attention=method == "separable")
    ones = jnp.ones_like(grid) * 0.05

    def body(carry, ig):
        i, g = ig
        return carry, jax.jvp(jax.checkpoint(f), (i, g), (i, ones[:1]))[1]

    _, scanned = jax.lax.scan(body, 0.0, (image[:, None], grid[:, None]))
    mapped = jax.vmap(lambda i, g: jax.jvp(f, (i[None], g[None]), (i[None], ones[:1]))[1][0])(
        image, grid)
    np.testing.assert_allclose(scanned[:, 0], mapped, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mapped, jax.jvp(f, (image, grid), (image, ones))[1],
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Smaller items: the module's method, low-precision images, empty batches, the path's log line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gather", "native"])
def test_spatial_transformer_method(method):
    from flax import nnx

    _method(method)
    loc = nnx.Sequential(lambda x: x.reshape(x.shape[0], -1), nnx.Linear(30, 4, rngs=nnx.Rngs(0)))
    st = stn_jax.SpatialTransformer(loc, loc_features=4, kind="affine", out_shape=(3, 4),
                                    method=method, rngs=nnx.Rngs(0))
    st.regression.bias[...] = jnp.array([0.9, 0.1, 0.05, -0.2, 1.1, 0.1])
    x, _ = _inputs(batch=3, hw=(5, 6), channels=1)
    out, theta = st(x)
    want = stn_jax.bilinear_sample(x, stn_jax.affine_grid(theta, (3, 4)), method="gather")
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="method"):
        stn_jax.SpatialTransformer(loc, loc_features=4, kind="affine", out_shape=(3, 4),
                                   method="fast", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_images_take_the_native_kernel(dtype):
    _method("native")
    from stn_jax import _fast_paths

    image, grid = _inputs(hw=(7, 8), channels=3)
    image = image.astype(dtype)
    assert _fast_paths.resolve_method("auto", image, grid) == "auto-native"
    ct = jnp.cos(jnp.arange(2 * 4 * 3 * 3, dtype=jnp.float32).reshape(2, 4, 3, 3))

    def run(method):
        f = _sampler(method)
        out, vjp = jax.vjp(f, image, grid)
        return (out,) + vjp(ct.astype(dtype))

    for name, got, want in zip(("out", "d_image", "d_grid"), run("native"), run("gather")):
        assert got.dtype == want.dtype, name
        # Both accumulate in float32 and round once to the image's dtype at the end.
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=1e-2, atol=1e-2, err_msg=name)
    out = run("native")[0]
    exact = _sampler("gather")(image.astype(jnp.float32), grid)
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("sampler,method", [("bilinear", m) for m in METHODS]
                         + [("nearest", "gather")])
def test_empty_batch_returns_empty_results(sampler, method):
    image, grid = jnp.zeros((0, 5, 6, 3)), jnp.zeros((0, 4, 2, 2))
    if sampler == "bilinear":
        f = _sampler(_method(method))
    else:
        f = stn_jax.nearest_sample
    assert f(image, grid).shape == (0, 4, 2, 3)
    d_image, d_grid = jax.grad(lambda i, g: jnp.sum(f(i, g)), argnums=(0, 1))(image, grid)
    assert d_image.shape == image.shape and d_grid.shape == grid.shape


def test_the_chosen_path_is_logged_once(monkeypatch):
    from absl import logging as absl_logging

    from stn_jax import _fast_paths

    records = []
    monkeypatch.setattr(absl_logging, "info", lambda msg, *args: records.append(msg % args))
    monkeypatch.setattr(_fast_paths, "_logged", set())
    f32 = jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 2, 2, 2))
    for _ in range(3):
        _fast_paths.resolve_method("auto", *f32)
    assert len(records) == 1
    if NATIVE:
        assert "native CPU kernel" in records[0] and _native.library() in records[0]
    monkeypatch.setattr(_native, "available", lambda: False)
    monkeypatch.setattr(_native, "error", lambda: "disabled by STN_JAX_NATIVE=0")
    _fast_paths.resolve_method("auto", *f32)
    _fast_paths.resolve_method("auto", *f32)
    assert len(records) == 2 and "gather path" in records[1] and "STN_JAX_NATIVE=0" in records[1]


def test_native_build_is_logged(monkeypatch, tmp_path):
    from absl import logging as absl_logging

    records = []
    monkeypatch.setattr(absl_logging, "info", lambda msg, *args: records.append(msg % args))
    monkeypatch.setenv("STN_JAX_NATIVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # fails at once: the log line comes before the compiler
    with pytest.raises(RuntimeError):
        _native.build()
    assert len(records) == 1 and "compiling the native sampler" in records[0]


# ---------------------------------------------------------------------------------------------
# Several devices: shard_map, Explicit meshes, the native kernel per shard (one subprocess)
# ---------------------------------------------------------------------------------------------

_MULTI_DEVICE = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
import stn_jax
from stn_jax import _native

assert jax.device_count() == 4, jax.devices()
results = {}
methods = ["auto", "gather", "separable"] + (["native"] if _native.available() else [])
rng = np.random.default_rng(0)
image = jnp.asarray(rng.normal(size=(8, 6, 7, 2)).astype(np.float32))
theta = jnp.eye(2, 3) + jnp.asarray(rng.uniform(-0.4, 0.4, (8, 2, 3)).astype(np.float32))
grid = stn_jax.affine_grid(theta, (5, 4))
ct = jnp.asarray(rng.normal(size=(8, 5, 4, 2)).astype(np.float32))


def value_and_grads(f, i, g):
    out, vjp = jax.vjp(f, i, g)
    return [out, *vjp(ct), jax.jvp(f, (i, g), (i, 0.1 * g))[1]]


def gaps(got, want):
    return [float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want)]


want = value_and_grads(lambda i, g: stn_jax.bilinear_sample(i, g, method="gather"), image, grid)

# shard_map over a batch axis, with the default (Auto) axes and check_vma on.
mesh = jax.make_mesh((4,), ("b",), axis_types=(AxisType.Auto,))
for method in methods:
    f = lambda i, g, m=method: stn_jax.bilinear_sample(i, g, method=m)
    sm = jax.shard_map(f, mesh=mesh, in_specs=(P("b"), P("b")), out_specs=P("b"))
    try:
        results[f"shard_map/{method}"] = gaps(jax.jit(lambda i, g: value_and_grads(sm, i, g))(
            image, grid), want)
    except Exception as err:
        results[f"shard_map/{method}"] = f"{type(err).__name__}: {err}"[:400]

# A mesh with Explicit axes (jax.make_mesh's default), batch-sharded operands.
mesh = jax.make_mesh((4,), ("b",), axis_types=(AxisType.Explicit,))
with jax.set_mesh(mesh):
    i_s = jax.device_put(image, P("b"))
    g_s = jax.device_put(grid, P("b"))
    for method in methods:
        f = lambda i, g, m=method: stn_jax.bilinear_sample(i, g, method=m)
        try:
            got = jax.jit(lambda i, g: value_and_grads(f, i, g))(i_s, g_s)
            results[f"explicit/{method}"] = gaps(got, want)
            results[f"explicit_spec/{method}"] = str(jax.typeof(got[0]).sharding.spec)
        except Exception as err:
            results[f"explicit/{method}"] = f"{type(err).__name__}: {err}"[:400]

# Batch sharding with Auto axes: the compiled program of a train-step-like function.
if _native.available():
    mesh = jax.make_mesh((4,), ("b",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, P("b"))
    i_s, g_s = jax.device_put(image, sharding), jax.device_put(grid, sharding)

    def step(i, g):  # the loss and its gradients
        return jax.value_and_grad(lambda i, g: jnp.sum(
            stn_jax.bilinear_sample(i, g, method="native") * ct), argnums=(0, 1))(i, g)

    compiled = jax.jit(step).lower(i_s, g_s).compile()
    results["hlo"] = compiled.as_text()
    got = compiled(i_s, g_s)[1]
    results["sharded_grads"] = gaps(got, want[1:3])
    results["sharded_grads_spec"] = [str(x.sharding.spec) for x in got]
print("RESULTS" + json.dumps(results))
'''


# One xdist worker runs this file (`pytest -n 2 --dist loadgroup`), so that the 4-device subprocess (about 20 s)
# is built once, not once per worker.
pytestmark = pytest.mark.xdist_group("composability")

@pytest.fixture(scope="module")
def multi_device(tmp_path_factory):
    script = tmp_path_factory.mktemp("multi") / "multi_device.py"
    script.write_text(_MULTI_DEVICE)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


def _check_gaps(results, key):
    value = results.get(key)
    if value is None and key.endswith("native"):
        pytest.skip(f"native kernels unavailable: {_native.error()}")
    assert isinstance(value, list), f"{key}: {value}"
    # out, d_image, d_grid, jvp against the gather path on one device.
    assert max(value) < 1e-4, f"{key}: {value}"


@pytest.mark.parametrize("method", METHODS)
def test_shard_map(multi_device, method):
    _check_gaps(multi_device, f"shard_map/{method}")


@pytest.mark.parametrize("method", METHODS)
def test_explicit_mesh_axes(multi_device, method):
    _check_gaps(multi_device, f"explicit/{method}")
    assert "'b'" in multi_device[f"explicit_spec/{method}"]


def test_native_kernel_runs_on_each_devices_shard(multi_device):
    if "hlo" not in multi_device:
        pytest.skip(f"native kernels unavailable: {_native.error()}")
    hlo = multi_device["hlo"]
    calls = [l for l in hlo.splitlines() if "custom_call_target=\"stn_jax_bilinear" in l]
    assert any("stn_jax_bilinear_forward" in l for l in calls), hlo[-2000:]
    assert any("stn_jax_bilinear_backward" in l for l in calls), hlo[-2000:]
    for call in calls:
        # Each device's call sees its 2 of the 8 images: image f32[2,6,7,2], grid f32[2,5,4,2].
        assert "f32[8," not in call, call
        assert "f32[2,6,7,2]" in call and "f32[2,5,4,2]" in call, call
    # Nothing is gathered to run them.
    assert "all-gather" not in hlo
    _check_gaps({"g": multi_device["sharded_grads"]}, "g")
    assert all("'b'" in s for s in multi_device["sharded_grads_spec"])


# ---------------------------------------------------------------------------------------------
# jax.export: portable by default, native by opt-in; a round trip into a fresh process
# ---------------------------------------------------------------------------------------------

_LOAD = r'''
import json, sys
import numpy as np
import jax

inputs = np.load(sys.argv[1])
out = {}
# The portable export needs nothing from stn_jax.
exported = jax.export.deserialize(open(sys.argv[2], "rb").read())
for batch in (3, 5):
    image, grid = inputs[f"image{batch}"], inputs[f"grid{batch}"]
    out[f"auto{batch}"] = [np.asarray(x).tolist() for x in exported.call(image, grid)]
out["stn_jax_imported"] = "stn_jax" in sys.modules
if len(sys.argv) > 3:
    import stn_jax
    stn_jax.register_native_kernels()
    exported = jax.export.deserialize(open(sys.argv[3], "rb").read())
    out["native3"] = [np.asarray(x).tolist()
                      for x in exported.call(inputs["image3"], inputs["grid3"])]
print("RESULTS" + json.dumps(out))
'''


def test_export_round_trip_in_a_fresh_process(tmp_path):
    def loss_grads(method):
        # A model-like function: sample, then the gradient of a loss of the samples.
        def f(image, grid):
            out = stn_jax.bilinear_sample(image, grid, method=method)
            d_image, d_grid = jax.grad(
                lambda i, g: jnp.sum(stn_jax.bilinear_sample(i, g, method=method) ** 2),
                argnums=(0, 1))(image, grid)
            return out, d_image, d_grid
        return f

    batch = jax.export.symbolic_shape("b")[0]
    specs = (jax.ShapeDtypeStruct((batch, 6, 7, 2), jnp.float32),
             jax.ShapeDtypeStruct((batch, 4, 5, 2), jnp.float32))
    portable = jax.export.export(jax.jit(loss_grads("auto")))(*specs)
    assert "stn_jax_bilinear" not in portable.mlir_module()
    (tmp_path / "auto.bin").write_bytes(portable.serialize())
    inputs = {}
    for b in (3, 5):
        image, grid = _inputs(batch=b, hw=(6, 7), out=(4, 5), seed=b)
        inputs[f"image{b}"], inputs[f"grid{b}"] = np.asarray(image), np.asarray(grid)
    np.savez(tmp_path / "inputs.npz", **inputs)
    args = [sys.executable, "-c", _LOAD, str(tmp_path / "inputs.npz"), str(tmp_path / "auto.bin")]
    if NATIVE:
        with pytest.raises(ValueError, match="custom call"):
            # Without the opt-in, the native kernel does not export silently.
            jax.export.export(jax.jit(loss_grads("native")))(*specs)
        targets = stn_jax.register_native_kernels()
        native = jax.export.export(
            jax.jit(loss_grads("native")),
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in targets],
        )(jax.ShapeDtypeStruct((3, 6, 7, 2), jnp.float32),
          jax.ShapeDtypeStruct((3, 4, 5, 2), jnp.float32))
        assert "stn_jax_bilinear_forward" in native.mlir_module()
        (tmp_path / "native.bin").write_bytes(native.serialize())
        args.append(str(tmp_path / "native.bin"))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))[7:])
    assert got["stn_jax_imported"] is False
    for b in (3, 5):
        want = loss_grads("gather")(jnp.asarray(inputs[f"image{b}"]), jnp.asarray(inputs[f"grid{b}"]))
        for g_, w_ in zip(got[f"auto{b}"], want):
            np.testing.assert_allclose(np.asarray(g_), w_, rtol=1e-5, atol=1e-5)
    if NATIVE:
        want = loss_grads("gather")(jnp.asarray(inputs["image3"]), jnp.asarray(inputs["grid3"]))
        for g_, w_ in zip(got["native3"], want):
            np.testing.assert_allclose(np.asarray(g_), w_, rtol=1e-5, atol=1e-5)


def test_export_with_symbolic_image_size():
    # The gather path also exports with symbolic H and W.
    h, w = jax.export.symbolic_shape("h, w")
    f = jax.jit(lambda i, g: stn_jax.bilinear_sample(i, g, method="gather"))
    exported = jax.export.export(f)(jax.ShapeDtypeStruct((2, h, w, 1), jnp.float32),
                                    jax.ShapeDtypeStruct((2, 3, 4, 2), jnp.float32))
    for hw in ((5, 6), (7, 4)):
        image, grid = _inputs(hw=hw, out=(3, 4), channels=1)
        np.testing.assert_allclose(exported.call(image, grid), f(image, grid), rtol=1e-6, atol=1e-6)
