"""One command that measures stn_jax on an accelerator (or the CPU) and writes a report.

In one process, in this order, each section guarded so that a failure is recorded and the rest
still runs:

1. ``environment``: platform, devices, versions (python, jax, jaxlib, flax, optax, numpy,
   torch), ``XLA_FLAGS``, whether the native CPU kernels load, nvidia-smi's line if any.
2. ``numerics`` (before any timing): on small random inputs, ``bilinear_sample`` on the default
   device (methods gather, separable on an axis-aligned grid, auto; float32 and bf16 images;
   every padding mode) against float64 ``torch.nn.functional.grid_sample`` on the CPU, values
   and both gradients, by ||out - ref|| / ||ref|| (pass: float32 < 1e-4, bf16 < 1e-2); the same
   against stn_jax on the CPU device; torch on its device against the same reference; and the
   ST-CNN's loss and parameter gradients on the device against the CPU device (pass: < 3e-2,
   since XLA may use TF32 for float32 convolutions on a GPU).
3. ``copy``: a device-to-device copy (JAX and torch), bytes read + written per second: the
   bandwidth floor the sampler's bytes/s are set against.
4. ``sampler``: ``bilinear_sample`` forward and forward+backward at the shapes of
   ``scripts/benchmark_sampler.py`` (its data: random affine grids, and axis-aligned attention
   grids for the separable path), gather and separable, float32 and bf16 images, against
   ``grid_sample`` on the same device (torch's bf16 takes a bf16 grid: it wants one dtype).
   Each implementation is timed in blocks of back-to-back calls ending in one synchronisation
   (median over repeats, turns interleaved); inputs rotate over several copies whose total
   passes ``--rotate_mb`` so that large caches do not hold them. bytes/s counts each input read
   once and each output written once.
5. ``train_steps``: the jitted SGD step of the MNIST models (RTS, 42x42, ST output 21x21) on a
   fixed random batch: steps/s, images/s, and the ST-CNN / CNN step-time ratio. Built with
   ``stn_jax.models.mnist.create_model`` and a step written here (value_and_grad of softmax
   cross-entropy over the ``nnx.Param`` state, ``optax.sgd``), not with ``stn_jax.train``.
6. ``input_pipeline``: images/s of the distortion generators (``stn_jax.data.distortions``:
   R, RTS, P, E, TC) on the bundled digits, digits resident on the device, and fed from the host
   with the images copied back, as a host-side pipeline does.
7. ``paper_schedule`` (``--paper_schedule``): MNIST RTS with ST-CNN (affine) on the bundled
   digits (4,000 train / 1,000 test): plain SGD, batch 256, lr 0.01 divided by 10 every 50k
   steps, 150k steps; if the measured step time says that does not fit in ``--max_minutes``,
   the schedule is shrunk to the steps that fit (decays at a third and two thirds) and the
   report says so. Data are generated on the device inside the scanned step. Ends with the
   test error on the distorted test digits.

Writes ``report.json`` and ``report.md`` to ``--out``; exits 1 if a section failed or a
numerics check did not pass. Needs jax, flax, optax, numpy and absl-py (torch for the
comparison and the reference); not ml_collections, tensorboardX or tensorflow-datasets.
Run from a checkout it needs no install (the checkout is put on ``sys.path``). On a machine
without network, bring the wheels listed by ``scripts/offline_wheels.py``: see
``docs/performance.md``, "Accelerator report and offline setup".

Usage::

  python3 scripts/accelerator_report.py --out /tmp/acc                      # all sections
  python3 scripts/accelerator_report.py --out /tmp/acc --paper_schedule --max_minutes 4
  JAX_PLATFORMS=cpu python scripts/accelerator_report.py --tiny --out /tmp/acc   # seconds
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback

# JAX must not take 75% of the GPU at start: torch times on the same device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

_REPO = pathlib.Path(__file__).resolve().parents[1]
try:
    import stn_jax  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(_REPO))
sys.path.insert(0, str(_REPO / "scripts"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import stn_jax  # noqa: E402

# Modules the target image lacks; the report says if any of them got imported.
NOT_ON_TARGET = ("ml_collections", "tensorboardX", "tensorflow_datasets", "tensorflow")
MODEL_NAMES = ("fcn", "cnn", "st_fcn", "st_cnn")
DISTORTION_NAMES = ("R", "RTS", "P", "E", "TC")
RTS_SHAPE = (42, 42, 1)  # [P]
ST_DOWNSAMPLE = 2  # [S]
TOL = {"float32": 1e-4, "bfloat16": 1e-2}  # relative error ||out - ref|| / ||ref||
MODEL_TOL = 3e-2
TINY_SHAPES = ("4x12x12x1-10x10", "2x16x16x3-8x8")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return math.inf
    den = np.linalg.norm(ref)
    num = np.linalg.norm(out - ref)
    return float(num / den) if den > 0 else float(num)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_device(torch) -> str:
    """'cuda' when JAX runs on a GPU and torch sees one; else 'cpu'."""
    if torch is not None and jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def cpu_device():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


# ---------------------------------------------------------------------------------------------
# 1. Environment
# ---------------------------------------------------------------------------------------------


def environment(args) -> dict:
    import flax
    import jaxlib
    import optax

    devices = jax.devices()
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "stn_jax": stn_jax.__version__,
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        "device_count": len(devices),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_platforms": os.environ.get("JAX_PLATFORMS", ""),
    }
    try:
        from stn_jax import _native

        info["native_available"] = bool(_native.available())
        if not info["native_available"]:
            info["native_error"] = str(_native.error())
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        info["native_available"] = False
        info["native_error"] = repr(err)
    torch = _torch()
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["torch_device"] = torch_device(torch)
        if info["torch_device"] == "cuda":
            props = torch.cuda.get_device_properties(0)
            info["torch_device_name"] = props.name
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["multiprocessors"] = props.multi_processor_count
            l2 = getattr(props, "L2_cache_size", None)
            if l2:
                info["l2_cache_mb"] = round(l2 / 2**20, 1)
    else:
        info["torch"] = None
    if shutil.which("nvidia-smi"):
        try:
            query = "name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu"
            res = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = res.stdout.strip()
        except Exception as err:  # noqa: BLE001
            info["nvidia_smi"] = repr(err)
    return info


# ---------------------------------------------------------------------------------------------
# 2. Numerics against the CPU reference
# ---------------------------------------------------------------------------------------------


def _vjp_fn(combos):
    """One jitted function for all combos (one compile): (images, grid, cots) -> per combo
    (out, d_image, d_grid); images and cots are dicts dtype name -> array."""

    def one(method, padding, align, image, grid, cot):
        def sample(image, grid):
            return stn_jax.bilinear_sample(image, grid, padding_mode=padding,
                                           align_corners=align, method=method)

        out, vjp = jax.vjp(sample, image, grid)
        return (out,) + vjp(cot)

    @jax.jit
    def fn(images, grid, cots):
        return [one(m, p, a, images[d], grid, cots[d]) for m, p, a, d in combos]

    return fn


def _torch_reference(torch, image, grid, cot, padding, align, device="cpu", dtype=None):
    """grid_sample and its two gradients; NHWC numpy in and out (float64 unless dtype)."""
    dtype = dtype or torch.float64
    img = torch.tensor(np.asarray(image, np.float64).transpose(0, 3, 1, 2), dtype=dtype,
                       device=device, requires_grad=True)
    grd = torch.tensor(np.asarray(grid, np.float64), dtype=dtype, device=device,
                       requires_grad=True)
    c = torch.tensor(np.asarray(cot, np.float64).transpose(0, 3, 1, 2), dtype=dtype, device=device)
    out = torch.nn.functional.grid_sample(img, grd, mode="bilinear", padding_mode=padding,
                                          align_corners=align)
    d_img, d_grd = torch.autograd.grad(out, (img, grd), c)
    as_np = lambda t: t.detach().to("cpu", torch.float64).numpy()  # noqa: E731
    return (as_np(out).transpose(0, 2, 3, 1), as_np(d_img).transpose(0, 2, 3, 1), as_np(d_grd))


def _sampler_cases(rng):
    """Small random inputs: (name, grids kind, image, grid, cotangent) float32 numpy."""
    from benchmark_sampler import random_attention, random_theta

    cases = []
    for name, kind, (b, h, w, c), (ho, wo) in (
        ("affine", "affine", (3, 9, 11, 2), (7, 5)),
        ("attention", "attention", (2, 10, 8, 3), (6, 9)),
    ):
        image = rng.standard_normal((b, h, w, c)).astype(np.float32)
        if kind == "affine":
            params = random_theta(rng, b) * np.float32(1.3)  # some points outside the image
            grid = stn_jax.affine_grid(jnp.asarray(params), (ho, wo))
        else:
            grid = stn_jax.attention_grid(jnp.asarray(random_attention(rng, b)), (ho, wo))
        cot = rng.standard_normal((b, ho, wo, c)).astype(np.float32)
        cases.append((name, image, np.asarray(grid), cot))
    return cases


def numerics(args) -> dict:
    torch = _torch()
    device = jax.devices()[0]
    cpu = cpu_device()
    on_cpu = device.platform == "cpu"
    rng = np.random.default_rng(args.seed)
    rows = []
    bf16 = jnp.bfloat16
    for case, image, grid, cot in _sampler_cases(rng):
        if case == "affine":
            combos = [("gather", "zeros", False, "float32"), ("auto", "zeros", False, "float32"),
                      ("gather", "zeros", False, "bfloat16")]
            if not args.tiny:  # the other modes and conventions cost --tiny compile time only
                combos += [("gather", p, False, "float32") for p in ("border", "reflection")]
                combos += [("gather", "zeros", True, "float32"),
                           ("gather", "zeros", True, "bfloat16")]
        else:
            combos = [("separable", "zeros", False, "float32"),
                      ("separable", "zeros", False, "bfloat16")]
            if not args.tiny:
                combos += [("separable", "border", True, "float32")]
        images = {"float32": jnp.asarray(image), "bfloat16": jnp.asarray(image).astype(bf16)}
        cots = {"float32": jnp.asarray(cot), "bfloat16": jnp.asarray(cot).astype(bf16)}
        fn = _vjp_fn(combos)

        def run(dev):
            put = functools.partial(jax.device_put, device=dev)
            res = fn(jax.tree.map(put, images), put(jnp.asarray(grid)), jax.tree.map(put, cots))
            return [[np.asarray(x.astype(jnp.float32)) for x in r] for r in res]

        got_all = run(device)
        cpu_all = run(cpu) if cpu is not None and not on_cpu else None
        for k, (method, padding, align, dtype) in enumerate(combos):
            got = got_all[k]
            row = {"case": case, "method": method, "padding": padding,
                   "align_corners": align, "dtype": dtype, "tol": TOL[dtype]}
            # float64 reference on the exact (rounded) inputs the device saw.
            img64 = np.asarray(images[dtype].astype(jnp.float32), np.float64)
            ct64 = np.asarray(cots[dtype].astype(jnp.float32), np.float64)
            ref = None
            if torch is not None:
                ref = _torch_reference(torch, img64, grid, ct64, padding, align)
                row["reference"] = "torch float64 (cpu)"
            if cpu_all is not None:
                row["vs_cpu"] = [rel_err(g, r) for g, r in zip(got, cpu_all[k])]
                if ref is None:
                    ref, row["reference"] = cpu_all[k], "stn_jax on the cpu device"
            if ref is None:
                raise RuntimeError("no reference: torch is not importable and JAX runs on "
                                   "the CPU already")
            row["rel_err"] = [rel_err(g, r) for g, r in zip(got, ref)]  # out, d_image, d_grid
            errs = row["rel_err"] + row.get("vs_cpu", [])
            row["passed"] = bool(all(e < TOL[dtype] for e in errs))
            rows.append(row)
            log(f"  numerics {case} {method} {padding} align={align} {dtype}: "
                f"rel err out/d_image/d_grid {', '.join(f'{e:.1e}' for e in row['rel_err'])}"
                f" {'ok' if row['passed'] else 'FAILED'}")
        if torch is not None and case == "affine":
            # torch on its device against the same float64 reference: the comparison is sound.
            tdev = torch_device(torch)
            ref = _torch_reference(torch, image, grid, cot, "zeros", False)
            got = _torch_reference(torch, image, grid, cot, "zeros", False, device=tdev,
                                   dtype=torch.float32)
            errs = [rel_err(g, r) for g, r in zip(got, ref)]
            rows.append({"case": case, "method": f"torch grid_sample ({tdev})", "padding": "zeros",
                         "align_corners": False, "dtype": "float32", "tol": TOL["float32"],
                         "reference": "torch float64 (cpu)", "rel_err": errs,
                         "passed": bool(all(e < TOL["float32"] for e in errs))})
    model = _model_numerics(args.numerics_model, args.seed, device, cpu)
    passed = all(r["passed"] for r in rows) and model.get("passed", True)
    return {"passed": passed, "sampler": rows, "model": model}


def _model_numerics(name, seed, device, cpu) -> dict:
    """A model's loss and parameter gradients on the device against the CPU device."""
    from flax import nnx
    import optax
    from stn_jax.models import mnist

    if cpu is None:
        return {"skipped": "no CPU device visible to JAX"}
    model = mnist.create_model(name, input_shape=RTS_SHAPE, st_downsample=ST_DOWNSAMPLE,
                               rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Push the regression layer off the identity so that the sampler's grid gradient matters
    # (in numpy: eager JAX ops would compile once per parameter shape).
    rng = np.random.default_rng(seed + 1)
    params = jax.tree.map(
        lambda p: np.asarray(p) + np.float32(0.01) * rng.standard_normal(p.shape, np.float32),
        params)
    images = rng.uniform(0, 1, (4,) + RTS_SHAPE).astype(np.float32)
    labels = rng.integers(0, 10, 4).astype(np.int32)

    @jax.jit
    def loss_and_grad(params, images, labels):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return jax.value_and_grad(loss_fn)(params)

    def run(dev):
        put = lambda x: jax.device_put(x, dev)  # noqa: E731
        loss, grads = loss_and_grad(jax.tree.map(put, params), put(images), put(labels))
        flat = np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(grads)])
        return float(loss), flat

    loss_d, grad_d = run(device)
    loss_c, grad_c = run(cpu)
    out = {"model": name, "loss_device": loss_d, "loss_cpu": loss_c,
           "loss_rel_err": rel_err(loss_d, loss_c), "grad_rel_err": rel_err(grad_d, grad_c),
           "tol": MODEL_TOL, "same_device": device.platform == "cpu"}
    out["passed"] = bool(out["loss_rel_err"] < MODEL_TOL and out["grad_rel_err"] < MODEL_TOL)
    log(f"  numerics {name} loss/grads device vs cpu: {out['loss_rel_err']:.1e}, "
        f"{out['grad_rel_err']:.1e} {'ok' if out['passed'] else 'FAILED'}")
    return out


# ---------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------


def _jax_sync(out):
    jax.block_until_ready(out)


def _torch_sync_fn(torch, device):
    if device == "cuda":
        return lambda out: torch.cuda.synchronize()
    return lambda out: None


def time_interleaved(fns: dict, *, repeats: int, target_s: float, max_inner: int) -> dict:
    """fns: name -> (call(i) -> output, sync(output)). Each call i takes input set i.

    Every function is warmed up, then calibrated: `inner` back-to-back calls per block so that
    a block lasts about `target_s`. Then `repeats` rounds, each function in turn timing one
    block that ends with a synchronisation. Returns name -> {median_s, min_s, inner} per call.
    """
    inner = {}
    for name, (call, sync) in fns.items():
        sync(call(0))
        sync(call(1))
        start = time.perf_counter()
        sync(call(2))
        one = max(time.perf_counter() - start, 1e-7)
        inner[name] = int(min(max_inner, max(1, math.ceil(target_s / one))))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (call, sync) in fns.items():
            n = inner[name]
            start = time.perf_counter()
            out = None
            for i in range(n):
                out = call(i)
            sync(out)
            times[name].append((time.perf_counter() - start) / n)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "inner": inner[name]}
            for name, t in times.items()}


def _copies(nbytes_one: int, rotate_bytes: int) -> int:
    """How many copies of an input set make its total pass rotate_bytes (at most 64)."""
    if rotate_bytes <= 0:
        return 1
    return int(min(64, max(1, math.ceil(rotate_bytes / max(nbytes_one, 1)))))


# ---------------------------------------------------------------------------------------------
# 3. Copy bandwidth
# ---------------------------------------------------------------------------------------------


def copy_bandwidth(args) -> dict:
    n = max(1, int(args.copy_mb * 2**20 // 4))
    fns = {}
    x = jax.device_put(jnp.arange(n, dtype=jnp.float32))
    copy = jax.jit(lambda v: v + 1.0)  # one read and one write of every element, like a copy
    fns["jax"] = (lambda i: copy(x), _jax_sync)
    torch = _torch()
    tdev = torch_device(torch) if torch is not None else None
    if torch is not None:
        src = torch.arange(n, dtype=torch.float32, device=tdev)
        dst = torch.empty_like(src)
        fns["torch"] = (lambda i: dst.copy_(src), _torch_sync_fn(torch, tdev))
    res = time_interleaved(fns, repeats=args.repeats, target_s=args.target_ms / 1e3,
                           max_inner=args.max_inner)
    out = {"bytes_moved": 2 * 4 * n, "torch_device": tdev}
    for name, r in res.items():
        r["bytes_per_s"] = 2 * 4 * n / r["median_s"]
        out[name] = r
        log(f"  copy {name}: {r['bytes_per_s'] / 1e9:.1f} GB/s (read + write, "
            f"{2 * 4 * n / 2**20:.0f} MiB a call)")
    out["floor_bytes_per_s"] = max(r["bytes_per_s"] for r in res.values())
    return out


# ---------------------------------------------------------------------------------------------
# 4. Sampler against torch grid_sample
# ---------------------------------------------------------------------------------------------


def _jax_sampler(method, dtype, image, grid, cot, copies):
    """(fwd, fwd_bwd, bytes_fwd, bytes_fwd_bwd) with call(i) over `copies` input sets."""
    img = jnp.asarray(image).astype(dtype)
    grd = jnp.asarray(grid)
    ct = jnp.asarray(cot).astype(dtype)
    sets = [tuple(jax.device_put(v) + 0 for v in (img, grd, ct)) for _ in range(copies)]

    def sample(image, grid):
        return stn_jax.bilinear_sample(image, grid, method=method)

    fwd = jax.jit(sample)

    @jax.jit
    def fwd_bwd(image, grid, cot):
        out, vjp = jax.vjp(sample, image, grid)
        return (out,) + vjp(cot)

    io = img.nbytes + grd.nbytes + ct.nbytes  # ct has the output's size and dtype
    return ((lambda i: fwd(*sets[i % copies][:2]), _jax_sync),
            (lambda i: fwd_bwd(*sets[i % copies]), _jax_sync),
            io,  # fwd: image, grid read; output written
            2 * io + ct.nbytes)  # fwd+bwd: + cotangent read, output, d_image, d_grid written


def _torch_sampler(torch, device, dtype, image, grid, cot, copies):
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    mk = lambda a: torch.tensor(np.asarray(a), device=device).to(tdtype)  # noqa: E731
    img = mk(image.transpose(0, 3, 1, 2)).contiguous()
    grd = mk(grid).contiguous()  # torch wants image and grid in one dtype
    ct = mk(cot.transpose(0, 3, 1, 2)).contiguous()
    sets = [(img.clone().requires_grad_(), grd.clone().requires_grad_(), ct.clone())
            for _ in range(copies)]
    sync = _torch_sync_fn(torch, device)
    kwargs = dict(mode="bilinear", padding_mode="zeros", align_corners=False)

    def fwd(i):
        with torch.no_grad():
            image, grid, _ = sets[i % copies]
            return torch.nn.functional.grid_sample(image, grid, **kwargs)

    def fwd_bwd(i):
        image, grid, c = sets[i % copies]
        out = torch.nn.functional.grid_sample(image, grid, **kwargs)
        return torch.autograd.grad(out, (image, grid), c)

    io = sum(v.numel() * v.element_size() for v in (img, grd, ct))
    return (fwd, sync), (fwd_bwd, sync), io, 2 * io + ct.numel() * ct.element_size()


def sampler(args, floor_bytes_per_s=None) -> dict:
    import benchmark_sampler as bs

    torch = _torch() if not args.no_torch else None
    tdev = torch_device(torch) if torch is not None else None
    shapes = [bs.parse_shape(s) for s in args.shapes]
    rows = []
    for shape, out_shape in shapes:
        for grids in ("affine", "attention"):
            image, grid, cot = bs.make_data(shape, out_shape, seed=args.seed, grids=grids)
            one_set = image.nbytes + grid.nbytes + 2 * cot.nbytes
            copies = _copies(one_set, int(args.rotate_mb * 2**20))
            impls = {}
            if grids == "affine":
                for dtype in ("float32", "bfloat16"):
                    impls[f"stn_jax gather {dtype}"] = lambda d=dtype: _jax_sampler(
                        "gather", jnp.dtype(d), image, grid, cot, copies)
            else:
                if not args.tiny:  # the gather path on the separable path's grids
                    impls["stn_jax gather float32"] = lambda: _jax_sampler(
                        "gather", jnp.float32, image, grid, cot, copies)
                for dtype in ("float32", "bfloat16"):
                    impls[f"stn_jax separable {dtype}"] = lambda d=dtype: _jax_sampler(
                        "separable", jnp.dtype(d), image, grid, cot, copies)
            if torch is not None:
                for dtype in (("float32", "bfloat16") if grids == "affine" else ("float32",)):
                    impls[f"torch {dtype}"] = lambda d=dtype: _torch_sampler(
                        torch, tdev, d, image, grid, cot, copies)
            built, failed = {}, {}
            for name, build in impls.items():
                try:
                    built[name] = build()
                except Exception as err:  # noqa: BLE001 - e.g. torch bf16 on an old CPU build
                    failed[name] = f"{type(err).__name__}: {err}"
            for mode, pos in (("fwd", 0), ("fwd+bwd", 1)):
                fns, nbytes = {}, {}
                for name, b in built.items():
                    try:  # compile and first call outside the timing; drop what fails
                        b[pos][1](b[pos][0](0))
                        fns[name] = b[pos]
                        nbytes[name] = b[2 + pos]
                    except Exception as err:  # noqa: BLE001
                        failed[f"{name} {mode}"] = f"{type(err).__name__}: {err}"
                res = time_interleaved(fns, repeats=args.repeats, target_s=args.target_ms / 1e3,
                                       max_inner=args.max_inner)
                torch_ref = res.get("torch float32", {}).get("median_s")
                for name, r in res.items():
                    bps = nbytes[name] / r["median_s"]
                    row = {"shape": list(shape), "out_shape": list(out_shape), "grids": grids,
                           "mode": mode, "impl": name, **r, "bytes": nbytes[name],
                           "bytes_per_s": bps, "copies": copies,
                           "ratio_to_torch_f32": r["median_s"] / torch_ref if torch_ref else None,
                           "fraction_of_copy": bps / floor_bytes_per_s if floor_bytes_per_s
                           else None}
                    rows.append(row)
                line = ", ".join(f"{n} {r['median_s'] * 1e3:.3f} ms" for n, r in res.items())
                log(f"  {'x'.join(map(str, shape))}->{out_shape[0]}x{out_shape[1]} {grids} "
                    f"{mode}: {line}")
            for name, err in failed.items():
                rows.append({"shape": list(shape), "out_shape": list(out_shape), "grids": grids,
                             "impl": name, "error": err})
                log(f"  {name}: {err}")
    return {"torch_device": tdev, "rows": rows}


# ---------------------------------------------------------------------------------------------
# 5. Train steps of the MNIST models
# ---------------------------------------------------------------------------------------------


def make_sgd_step(model, learning_rate: float = 0.01):
    """A jitted plain-SGD step for an nnx model: (params, opt_state, images, labels) ->
    (params, opt_state, loss); params and opt_state donated. Returns (step, params, opt_state).

    Written here, not taken from stn_jax.train, so that this report does not depend on the
    training loop's internals.
    """
    from flax import nnx
    import optax

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(learning_rate)

    def loss_fn(params, images, labels):
        logits = nnx.merge(graphdef, params, rest)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, tx.init(params), (graphdef, rest)


def time_train_step(name: str, *, batch: int, steps: int, repeats: int, seed: int = 0) -> dict:
    """Steps/s of one MNIST model's SGD step on a fixed random RTS batch (42x42)."""
    from flax import nnx
    from stn_jax.models import mnist

    model = mnist.create_model(name, transform="affine", input_shape=RTS_SHAPE,
                               st_downsample=ST_DOWNSAMPLE, rngs=nnx.Rngs(seed))
    n_params = sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    step, params, opt_state, _ = make_sgd_step(model)
    rng = np.random.default_rng(seed)
    images = jax.device_put(rng.uniform(0, 1, (batch,) + RTS_SHAPE).astype(np.float32))
    labels = jax.device_put(rng.integers(0, 10, batch).astype(np.int32))
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, images, labels)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - start
    params, opt_state, loss = step(params, opt_state, images, labels)
    jax.block_until_ready(loss)
    per_step = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            params, opt_state, loss = step(params, opt_state, images, labels)
        jax.block_until_ready(loss)
        per_step.append((time.perf_counter() - start) / steps)
    med = statistics.median(per_step)
    return {"model": name, "params": n_params, "batch": batch, "compile_s": compile_s,
            "step_s": med, "min_step_s": min(per_step), "steps_per_s": 1 / med,
            "images_per_s": batch / med, "final_loss": float(loss)}


def train_steps(args) -> dict:
    rows = []
    for name in args.models.split(","):
        try:
            r = time_train_step(name, batch=args.train_batch, steps=args.train_steps,
                                repeats=args.repeats, seed=args.seed)
            log(f"  {name}: {r['step_s'] * 1e3:.2f} ms a step, {r['steps_per_s']:.1f} steps/s "
                f"(compile {r['compile_s']:.1f} s, {r['params']} params)")
        except Exception as err:  # noqa: BLE001 - one model's failure does not hide the others
            r = {"model": name, "error": f"{type(err).__name__}: {err}",
                 "traceback": traceback.format_exc()}
            log(f"  {name}: {r['error']}")
        rows.append(r)
    by = {r["model"]: r for r in rows if "step_s" in r}
    ratios = {}
    for st, base in (("st_cnn", "cnn"), ("st_fcn", "fcn")):
        if st in by and base in by:
            ratios[f"{st}_over_{base}_step_time"] = by[st]["step_s"] / by[base]["step_s"]
    if ratios:
        log("  " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    out = {"batch": args.train_batch, "input_shape": list(RTS_SHAPE), "rows": rows,
           "ratios": ratios}
    if any("error" in r for r in rows):
        out["error"] = "a model failed (see rows)"
    return out


# ---------------------------------------------------------------------------------------------
# 6. Input pipeline: the distortion generators
# ---------------------------------------------------------------------------------------------


def _digits(num: int, rng) -> tuple[np.ndarray, str]:
    """uint8 (num, 28, 28) digits: the bundled ones (cycled), or random if they are unreadable."""
    try:
        from stn_jax.data import mnist

        images = mnist.read_bundled()[0]
        return images[np.arange(num) % images.shape[0]], "bundled"
    except Exception as err:  # noqa: BLE001 - the speed does not depend on the ink
        log(f"  bundled digits unreadable ({err}); timing on random digits")
        return rng.integers(0, 256, (num, 28, 28), dtype=np.uint8), "random"


def input_pipeline(args) -> dict:
    from stn_jax.data import distortions

    batch = args.pipeline_batch
    rng = np.random.default_rng(args.seed)
    pool, source = _digits(max(4 * batch, 64), rng)
    keys = list(jax.random.split(jax.random.key(args.seed), 64))
    rows = []
    for name in args.distortions.split(","):
        try:
            gen = distortions.distortion_fn(name)
            index = rng.integers(0, pool.shape[0], (8, batch))
            others = rng.integers(0, pool.shape[0], (8, batch, 6))

            def host_batch(i):
                digits = (pool[index[i % 8]].astype(np.float32) / 255.0)[..., None]
                if name == "TC":
                    clutter = (pool[others[i % 8]].astype(np.float32) / 255.0)[..., None]
                    return digits, clutter
                return (digits,)

            dev_batches = [tuple(jax.device_put(a) for a in host_batch(i)) for i in range(8)]

            def on_device(i):
                return gen(keys[i % len(keys)], *dev_batches[i % 8])[0]

            def host_fed(i):
                return np.asarray(gen(keys[i % len(keys)], *host_batch(i))[0])

            fns = {"device": (on_device, _jax_sync), "host_fed": (host_fed, lambda out: None)}
            res = time_interleaved(fns, repeats=args.repeats, target_s=args.target_ms / 1e3,
                                   max_inner=args.max_inner)
            row = {"distortion": name, "batch": batch}
            for mode, r in res.items():
                row[f"{mode}_images_per_s"] = batch / r["median_s"]
            rows.append(row)
            log(f"  {name}: {row['device_images_per_s']:.0f} images/s on the device, "
                f"{row['host_fed_images_per_s']:.0f} host-fed")
        except Exception as err:  # noqa: BLE001
            rows.append({"distortion": name, "error": f"{type(err).__name__}: {err}"})
            log(f"  {name}: {rows[-1]['error']}")
    out = {"digits": source, "batch": batch, "rows": rows}
    if any("error" in r for r in rows):
        out["error"] = "a distortion failed (see rows)"
    return out


# ---------------------------------------------------------------------------------------------
# 7. The paper's MNIST RTS schedule
# ---------------------------------------------------------------------------------------------

PAPER = {"steps": 150_000, "batch": 256, "learning_rate": 0.01, "decay_every": 50_000,
         "decay_factor": 0.1}  # [S]


def paper_schedule(args, deadline: float) -> dict:
    """ST-CNN on RTS with the paper's SGD schedule, shrunk if it does not fit the time left."""
    from flax import nnx
    import optax
    from stn_jax.data import distortions, mnist
    from stn_jax.models import mnist as models

    data = mnist.load_bundled(test_fraction=0.2, split_seed=0)
    batch = args.paper_batch
    chunk = args.paper_chunk
    model = models.create_model(args.paper_model, transform="affine", input_shape=RTS_SHAPE,
                                st_downsample=ST_DOWNSAMPLE, rngs=nnx.Rngs(args.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    train_digits = jax.device_put((data.train_images.astype(np.float32) / 255.0)[..., None])
    train_labels = jax.device_put(data.train_labels)
    data_key = jax.random.fold_in(jax.random.key(args.seed), 1)

    def loss_fn(params, images, labels):
        logits = nnx.merge(graphdef, params, rest)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @functools.partial(jax.jit, donate_argnums=(0,))
    def train_chunk(params, step0, decay_every, index, digits, labels):
        """`chunk` plain-SGD steps; index (chunk, batch) into the training digits."""

        def body(carry, idx):
            params, step = carry
            images, _ = distortions.rotate_translate_scale(
                jax.random.fold_in(data_key, step), digits[idx])
            loss, grads = jax.value_and_grad(loss_fn)(params, images, labels[idx])
            lr = PAPER["learning_rate"] * PAPER["decay_factor"] ** (step // decay_every)
            params = jax.tree.map(lambda p, g: p - lr.astype(p.dtype) * g, params, grads)
            return (params, step + 1), loss

        (params, _), losses = jax.lax.scan(body, (params, step0), index)
        return params, losses

    n_train = data.train_images.shape[0]
    perm_rng = np.random.default_rng(args.seed)
    stream = np.empty(0, np.int64)

    def next_index():
        nonlocal stream
        need = chunk * batch
        while stream.size < need:  # epochs of permutations, as one endless stream
            stream = np.concatenate([stream, perm_rng.permutation(n_train)])
        idx, stream = stream[:need], stream[need:]
        return jnp.asarray(idx.reshape(chunk, batch), jnp.int32)

    start = time.perf_counter()
    step, losses = 0, None
    # The first chunk compiles; the second gives the step time that sizes the schedule.
    params, losses = train_chunk(params, jnp.int32(step), jnp.int32(PAPER["decay_every"]),
                                 next_index(), train_digits, train_labels)
    jax.block_until_ready(losses)
    compile_s = time.perf_counter() - start
    step += chunk
    t0 = time.perf_counter()
    params, losses = train_chunk(params, jnp.int32(step), jnp.int32(PAPER["decay_every"]),
                                 next_index(), train_digits, train_labels)
    jax.block_until_ready(losses)
    step_s = (time.perf_counter() - t0) / chunk
    step += chunk
    reserve = 2.0 if args.tiny else 30.0  # for the test set and the report
    left = deadline - time.perf_counter() - reserve
    fit = int(left / step_s) + step if left > 0 else step
    planned = min(args.paper_steps, max(step, fit // chunk * chunk))
    scaled = planned < PAPER["steps"]
    decay_every = max(1, planned // 3) if scaled else PAPER["decay_every"]
    if scaled and step >= decay_every:
        log(f"  only {planned} steps fit; the first {step} already ran at lr 0.01")
    log(f"  step {step_s * 1e3:.2f} ms (compile {compile_s:.1f} s): {planned} steps planned "
        f"({'shrunk' if scaled else 'the paper'}; lr / 10 every {decay_every})")
    last_log = time.perf_counter()
    stopped_early = False
    while step < planned:
        if time.perf_counter() > deadline - reserve:
            stopped_early = True
            break
        params, losses = train_chunk(params, jnp.int32(step), jnp.int32(decay_every),
                                     next_index(), train_digits, train_labels)
        step += chunk
        if time.perf_counter() - last_log > 30:
            log(f"  step {step}/{planned}, loss {float(jnp.mean(losses)):.3f}")
            last_log = time.perf_counter()
    jax.block_until_ready(losses)
    train_s = time.perf_counter() - start
    # Steps/s after the first (compiling) chunk.
    steps_per_s = (step - chunk) / (time.perf_counter() - start - compile_s)

    @jax.jit
    def predict(params, images):
        return jnp.argmax(nnx.merge(graphdef, params, rest)(images), -1)

    test = (data.test_images.astype(np.float32) / 255.0)[..., None]
    test_images, _ = distortions.rotate_translate_scale(jax.random.key(0), jnp.asarray(test))
    wrong = 0
    for s in range(0, test.shape[0], 500):
        pred = np.asarray(predict(params, test_images[s:s + 500]))
        wrong += int(np.sum(pred != data.test_labels[s:s + 500]))
    error = 100.0 * wrong / test.shape[0]
    log(f"  {step} steps in {train_s:.0f} s ({steps_per_s:.1f} steps/s after compiling): "
        f"test error {error:.2f}% on {test.shape[0]} digits")
    return {"model": args.paper_model, "transform": "affine",
            "data": "bundled (4000 train / 1000 test)", "batch": batch,
            "paper_steps": PAPER["steps"], "planned_steps": planned, "steps_done": step,
            "schedule_scaled": scaled, "decay_every": decay_every,
            "stopped_early": stopped_early, "compile_s": compile_s, "step_s_estimate": step_s,
            "train_wall_s": train_s, "steps_per_s": steps_per_s,
            "final_loss": float(jnp.mean(losses)), "test_error_percent": error,
            "momentum": 0.0, "learning_rate": PAPER["learning_rate"]}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    lines = ["# stn_jax accelerator report", ""]
    env = report.get("environment", {})
    lines += [f"- {k}: {env[k]}" for k in ("backend", "devices", "torch_device_name", "platform",
                                           "python", "jax", "jaxlib", "flax", "torch",
                                           "xla_flags", "nvidia_smi") if env.get(k)]
    lines += [f"- started {report['started']}, {report['elapsed_s']:.0f} s, "
              f"arguments `{' '.join(report['argv'])}`", ""]
    num = report.get("numerics", {})
    lines += ["## Numerics (before timing)", "",
              f"passed: **{num.get('passed')}**; reference: float64 torch grid_sample on the CPU "
              "(and stn_jax on the CPU device where the run is not on the CPU)", "",
              "| case | method | padding | align | dtype | rel err out / d_image / d_grid | "
              "vs CPU device | pass |", "|---|---|---|---|---|---|---|---|"]
    for r in num.get("sampler", []):
        vs = " / ".join(f"{e:.1e}" for e in r["vs_cpu"]) if "vs_cpu" in r else "-"
        lines.append(f"| {r['case']} | {r['method']} | {r['padding']} | {r['align_corners']} | "
                     f"{r['dtype']} | {' / '.join(f'{e:.1e}' for e in r['rel_err'])} | {vs} | "
                     f"{'ok' if r['passed'] else 'FAIL'} |")
    m = num.get("model", {})
    if "grad_rel_err" in m:
        lines += ["", f"ST-CNN on the device against the CPU device: loss {m['loss_rel_err']:.1e}, "
                  f"parameter gradients {m['grad_rel_err']:.1e} (tol {m['tol']})"]
    cp = report.get("copy", {})
    if "floor_bytes_per_s" in cp:
        lines += ["", "## Copy bandwidth (read + write)", ""]
        lines += [f"- {n}: {cp[n]['bytes_per_s'] / 1e9:.1f} GB/s" for n in ("jax", "torch")
                  if n in cp]
    sm = report.get("sampler", {})
    if sm.get("rows"):
        lines += ["", f"## bilinear_sample against grid_sample (torch on {sm.get('torch_device')})",
                  "", "| shape | grids | mode | impl | median ms | x torch f32 | GB/s | "
                  "of copy |", "|---|---|---|---|---|---|---|---|"]
        for r in sm["rows"]:
            shape = f"{'x'.join(map(str, r['shape']))}->{r['out_shape'][0]}x{r['out_shape'][1]}"
            if "error" in r:
                lines.append(f"| {shape} | {r['grids']} | | {r['impl']} | error: {r['error']} "
                             "| | | |")
                continue
            lines.append(f"| {shape} | {r['grids']} | {r['mode']} | {r['impl']} | "
                         f"{r['median_s'] * 1e3:.4f} | {_fmt(r['ratio_to_torch_f32'], '.2f')} | "
                         f"{r['bytes_per_s'] / 1e9:.1f} | {_fmt(r['fraction_of_copy'], '.2f')} |")
    ts = report.get("train_steps", {})
    if ts.get("rows"):
        lines += ["", f"## Train steps (RTS 42x42, batch {ts['batch']}, plain SGD)", "",
                  "| model | params | step ms | steps/s | images/s |", "|---|---|---|---|---|"]
        for r in ts["rows"]:
            if "error" in r:
                lines.append(f"| {r['model']} | error: {r['error']} | | | |")
            else:
                lines.append(f"| {r['model']} | {r['params']} | {r['step_s'] * 1e3:.3f} | "
                             f"{r['steps_per_s']:.1f} | {r['images_per_s']:.0f} |")
        lines += [""] + [f"- {k}: {v:.3f}" for k, v in ts.get("ratios", {}).items()]
    ip = report.get("input_pipeline", {})
    if ip.get("rows"):
        lines += ["", f"## Input pipeline (distortion generators, batch {ip['batch']}, "
                  f"{ip['digits']} digits)", "",
                  "| distortion | images/s, digits on the device | images/s, host-fed |",
                  "|---|---|---|"]
        for r in ip["rows"]:
            if "error" in r:
                lines.append(f"| {r['distortion']} | error: {r['error']} | |")
            else:
                lines.append(f"| {r['distortion']} | {r['device_images_per_s']:.0f} | "
                             f"{r['host_fed_images_per_s']:.0f} |")
    ps = report.get("paper_schedule", {})
    if "test_error_percent" in ps:
        stopped = "; stopped at the deadline" if ps["stopped_early"] else ""
        lines += ["", f"## Paper schedule (MNIST RTS, {ps['model']} affine, bundled digits)", "",
                  f"- {ps['steps_done']} of {ps['paper_steps']} steps (batch {ps['batch']}; "
                  f"schedule {'shrunk' if ps['schedule_scaled'] else 'as in the paper'}, lr / 10 "
                  f"every {ps['decay_every']}{stopped})",
                  f"- {ps['train_wall_s']:.0f} s of training, compile included "
                  f"({ps['compile_s']:.1f} s; then {ps['steps_per_s']:.1f} steps/s), "
                  f"test error **{ps['test_error_percent']:.2f}%**"]
    errors = {k: v for k, v in report.items() if isinstance(v, dict) and v.get("status") == "error"}
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {k}: {v.get('error')}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for report.json and report.md")
    p.add_argument("--tiny", action="store_true",
                   help="tiny sizes for a CPU smoke run (seconds): what the test runs")
    p.add_argument("--paper_schedule", action="store_true",
                   help="also train ST-CNN on RTS with the paper's schedule (fitted to "
                   "--max_minutes)")
    p.add_argument("--max_minutes", type=float, default=8.0,
                   help="time budget of the whole run; the paper schedule gets what is left")
    p.add_argument("--skip", default="",
                   help="comma-separated sections to skip: numerics, copy, sampler, "
                   "train_steps, input_pipeline")
    p.add_argument("--shapes", default=None,
                   help="BxHxWxC-H'xW',... (default: those of scripts/benchmark_sampler.py)")
    p.add_argument("--models", default=None,
                   help=f"models whose train step is timed (default {','.join(MODEL_NAMES)})")
    p.add_argument("--distortions", default=None,
                   help=f"generators timed (default {','.join(DISTORTION_NAMES)})")
    p.add_argument("--numerics_model", default=None,
                   help="model checked on the device against the CPU (default st_cnn)")
    p.add_argument("--paper_model", default=None, help="model of --paper_schedule (st_cnn)")
    p.add_argument("--paper_steps", type=int, default=None,
                   help="steps of --paper_schedule at most (the paper's 150000)")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per implementation")
    p.add_argument("--target_ms", type=float, default=None, help="length of one timed block")
    p.add_argument("--max_inner", type=int, default=1000, help="most calls in one timed block")
    p.add_argument("--copy_mb", type=float, default=None, help="size of the copied array")
    p.add_argument("--rotate_mb", type=float, default=None,
                   help="input copies rotate until their total passes this (defeats caches)")
    p.add_argument("--train_batch", type=int, default=None)
    p.add_argument("--train_steps", type=int, default=None, help="steps per timed block")
    p.add_argument("--pipeline_batch", type=int, default=None)
    p.add_argument("--paper_batch", type=int, default=None)
    p.add_argument("--paper_chunk", type=int, default=None, help="steps per scanned call")
    p.add_argument("--no_torch", action="store_true", help="do not time torch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    accel = jax.default_backend() != "cpu"
    defaults = dict(  # (tiny, CPU, accelerator)
        repeats=(3, 5, 15), target_ms=(2.0, 20.0, 20.0), copy_mb=(4, 256, 2048),
        rotate_mb=(0, 0, 256), train_batch=(8, 64, 256), train_steps=(2, 3, 20),
        pipeline_batch=(16, 256, 256), paper_batch=(8, 256, 256), paper_chunk=(4, 20, 100))
    for name, (tiny, cpu, acc) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else acc if accel else cpu)
    if args.shapes is None:
        import benchmark_sampler as bs

        args.shapes = list(bs.DEFAULT_SHAPES)
    else:
        args.shapes = args.shapes.split(",")
    # --tiny exercises every code path with the cheapest compiles: the FCN pair stands in for
    # the CNN pair (same step code), one generator, a few steps of the schedule.
    tiny_or = lambda tiny, full: tiny if args.tiny else full  # noqa: E731
    for name, tiny, full in (("models", "fcn,st_fcn", ",".join(MODEL_NAMES)),
                             ("distortions", "RTS", ",".join(DISTORTION_NAMES)),
                             ("numerics_model", "st_fcn", "st_cnn"),
                             ("paper_model", "st_fcn", "st_cnn"),
                             ("paper_steps", 12, PAPER["steps"])):
        if getattr(args, name) is None:
            setattr(args, name, tiny_or(tiny, full))
    if args.tiny:
        args.shapes = TINY_SHAPES[:1]
    return args


def run_section(report: dict, name: str, fn, *fn_args) -> None:
    log(f"== {name}")
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        report[name] = {"status": "ok", **fn(*fn_args)}
        if "error" in report[name]:
            report[name]["status"] = "error"
    except Exception as err:  # noqa: BLE001 - recorded; the other sections still run
        report[name] = {"status": "error", "error": f"{type(err).__name__}: {err}",
                        "traceback": traceback.format_exc()}
        log(f"  FAILED: {report[name]['error']}")
    report[name]["seconds"] = time.perf_counter() - start
    report[name]["cpu_seconds"] = time.process_time() - cpu_start
    log(f"  ({report[name]['seconds']:.1f} s, {report[name]['cpu_seconds']:.1f} s of CPU)")


def write(report: dict, out: pathlib.Path, start: float) -> None:
    report["elapsed_s"] = time.perf_counter() - start
    report["modules_not_on_target_imported"] = [m for m in NOT_ON_TARGET if m in sys.modules]
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))


def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    deadline = start + 60.0 * args.max_minutes
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"argv": sys.argv[1:] if argv is None else list(argv),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tiny": args.tiny}
    skip = set(filter(None, args.skip.split(",")))
    run_section(report, "environment", environment, args)
    log(f"  {report['environment'].get('backend')}: {report['environment'].get('devices')}")
    if "numerics" not in skip:
        run_section(report, "numerics", numerics, args)
    if "copy" not in skip:
        run_section(report, "copy", copy_bandwidth, args)
    floor = report.get("copy", {}).get("floor_bytes_per_s")
    for name, fn, fn_args in (("sampler", sampler, (args, floor)),
                              ("train_steps", train_steps, (args,)),
                              ("input_pipeline", input_pipeline, (args,))):
        if name not in skip:
            run_section(report, name, fn, *fn_args)
            write(report, out, start)  # a run cut short still leaves what it measured
    if args.paper_schedule:
        run_section(report, "paper_schedule", paper_schedule, args, deadline)
    write(report, out, start)
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("status") == "error"]
    numerics_ok = report.get("numerics", {}).get("passed", "numerics" in skip)
    numerics_said = ("skipped" if "numerics" in skip else "passed" if numerics_ok
                     else "FAILED")
    log(f"wrote {out / 'report.json'} and {out / 'report.md'} ({report['elapsed_s']:.0f} s); "
        f"numerics {numerics_said}; "
        f"failed sections: {', '.join(failed) or 'none'}")
    print(markdown(report), flush=True)
    return 0 if numerics_ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
