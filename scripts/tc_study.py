r"""TC study: CNN vs ST-CNN on distorted MNIST (TC, RTS), chosen on a validation split.

Builds the data, the model, the optimiser and the train step itself (only the generators,
`stn_jax.data.distortions`, the bundled digits, `stn_jax.data.mnist`, and the Table-1 models,
`stn_jax.models.mnist`, come from the package), so that the study does not depend on the
training loop or the configs. What it adds over `experiments.train`:

- a validation split carved from the training digits: `--eval=val` trains on the first
  `--num_train` digits of `numpy.random.default_rng(0).permutation(4000)` of the bundled training
  digits (the same subset `--config.data.num_train` picks in the pipeline) and evaluates on the
  next `--num_val` of them; the test digits are never read. `--eval=test` trains on all 4,000
  and evaluates on the 1,000 bundled test digits, as `configs/mnist_tc.py:runlocal=True` does.
  TC clutter comes from other digits of the same split.
- the transformer's affine theta over training, on the first 500 evaluation images: its scale
  sqrt|det A| (1 = the whole canvas, 0.47 = a 28-pixel window on 60x60), the distance in pixels
  between the window's centre and the digit's 28x28 frame centre (TC only), and the share of
  the digit's ink inside the window (TC only).

Example (the runlocal TC recipe, validation, 300 steps; `--st_downsample=2` for the study's
old recipe):

  .venv/bin/python scripts/tc_study.py --distortion=TC --model=st_cnn --eval=val \
      --steps=300 --out=/tmp/tc/st_val

Writes `<out>/metrics.json` (final error, curve, theta statistics, settings, wall time) and
`<out>/pictures/step_XXXXXX.png` (ST models).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import stn_jax
from stn_jax.data import distortions
from stn_jax.data import mnist as mnist_data
from stn_jax.models import mnist as models

# The generators' settings of each distortion (configs/mnist_{tc,rts}.py).
_CANVAS = {"TC": 60, "RTS": 42}
_VAL_SEED = 1234  # Distortions of the validation set (the test set uses test_seed 0).
_TEST_SEED = 0
_STATS_IMAGES = 500


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--distortion", choices=("TC", "RTS"), default="TC")
    p.add_argument("--model", choices=("cnn", "st_cnn"), default="st_cnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", choices=("val", "test"), default="val")
    p.add_argument("--num_train", type=int, default=3000, help="training digits for --eval=val")
    p.add_argument("--num_val", type=int, default=1000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--lr_decay_every", type=int, default=1000)
    p.add_argument("--lr_decay_factor", type=float, default=0.1)
    p.add_argument("--loc_lr_multiplier", type=float, default=0.1)
    p.add_argument("--st_downsample", type=int, default=None,
                   help="the ST output's side / the input's; default: the runlocal config's "
                        "(1 on TC, 2 on RTS); the study's old TC recipe is 2")
    p.add_argument("--clutter_count", type=int, default=6)
    p.add_argument("--clutter_size", type=int, default=6)
    p.add_argument("--clutter_combine", choices=("add", "max"), default="add")
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--stats_every", type=int, default=100)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- data


def _as_float(images_u8: np.ndarray) -> np.ndarray:
    return (images_u8.astype(np.float32) / 255.0)[..., None]


def split_digits(*, eval_on: str, num_train: int, num_val: int):
    """(train_images, train_labels, eval_images, eval_labels) uint8 digits of the bundled set."""
    data = mnist_data.load_mnist(source="bundled")
    if eval_on == "test":
        return data.train_images, data.train_labels, data.test_images, data.test_labels
    n = data.train_images.shape[0]
    if num_train + num_val > n:
        raise ValueError(f"num_train + num_val must be <= {n}, got {num_train + num_val}")
    perm = np.random.default_rng(0).permutation(n)
    train, val = np.sort(perm[:num_train]), np.sort(perm[num_train:num_train + num_val])
    return (data.train_images[train], data.train_labels[train],
            data.train_images[val], data.train_labels[val])


def distort(key, pool: np.ndarray, index: np.ndarray, args, *, clutter: bool = True):
    """pool[index] distorted; TC clutter from other digits of pool. Returns (images, params)."""
    digits = _as_float(pool[index])
    k_clutter, k_distort = jax.random.split(key)
    canvas = _CANVAS[args.distortion]
    if args.distortion == "TC":
        n = pool.shape[0]
        shift = jax.random.randint(k_clutter, (index.size, args.clutter_count), 1, n)
        others = _as_float(pool[(index[:, None] + np.asarray(shift)) % n])
        if not clutter:  # Same keys, so the same digit positions: the digit layer alone.
            others = np.zeros_like(others)
        images, params = distortions.cluttered(
            k_distort, digits, others, canvas=canvas, clutter_size=args.clutter_size,
            combine=args.clutter_combine)
    else:
        images, params = distortions.rotate_translate_scale(
            k_distort, digits, canvas=canvas, rotation_deg=45.0, scale_min=0.7, scale_max=1.2)
    return np.asarray(images, np.float32), jax.device_get(params)


def train_batch(step: int, pool, labels, args, distort_key):
    """Batch of `step`: an endless stream of per-epoch permutations, fresh distortions."""
    positions = step * args.batch_size + np.arange(args.batch_size)
    epochs = positions // pool.shape[0]
    index = np.empty(args.batch_size, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([args.seed, int(epoch)]).permutation(pool.shape[0])
        here = epochs == epoch
        index[here] = perm[positions[here] % pool.shape[0]]
    images, _ = distort(jax.random.fold_in(distort_key, step), pool, index, args)
    return {"image": images, "label": labels[index].astype(np.int32)}


# ------------------------------------------------------------------------------ optimiser


def make_optimizer(args) -> optax.GradientTransformation:
    """SGD with momentum on the staircase schedule; the transformer's updates scaled by
    loc_lr_multiplier (the same as scaling its learning rate, SGD and momentum being linear)."""
    schedule = optax.exponential_decay(args.learning_rate, args.lr_decay_every,
                                       args.lr_decay_factor, staircase=True)
    sgd = optax.sgd(schedule, momentum=args.momentum or None)

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "loc" if any(getattr(k, "key", None) == "transformer"
                                         for k in path) else "base", params)

    return optax.multi_transform(
        {"base": sgd, "loc": optax.chain(sgd, optax.scale(args.loc_lr_multiplier))}, labels)


# ---------------------------------------------------------------------------------- theta


def theta_stats(theta: np.ndarray, grid: np.ndarray, digit_offset, digit_layer, canvas: int):
    """Scale, centre error (px) and ink captured by affine theta (B, 2, 3) on the eval images."""
    a, t = theta[:, :, :2], theta[:, :, 2]
    scale = np.sqrt(np.abs(np.linalg.det(a)))
    out = {"scale_mean": float(scale.mean()), "scale_std": float(scale.std()),
           "t_abs_mean": float(np.abs(t).mean())}
    if digit_offset is not None:
        centre = (np.asarray(digit_offset, np.float64) + 14.0) / (canvas / 2.0) - 1.0
        err = np.linalg.norm(t - centre, axis=-1) * canvas / 2.0
        out["centre_err_px_mean"] = float(err.mean())
        out["centre_err_px_median"] = float(np.median(err))
        # Ink of the digit layer inside the window: the sampled digit layer times the input
        # area of one output pixel (|det A| * (canvas / out side)^2), over the digit's ink.
        sampled = np.asarray(stn_jax.bilinear_sample(jnp.asarray(digit_layer), jnp.asarray(grid)))
        pixel_area = np.abs(np.linalg.det(a)) * (canvas / grid.shape[1]) ** 2
        ink = sampled.sum(axis=(1, 2, 3)) * pixel_area / digit_layer.sum(axis=(1, 2, 3))
        out["ink_captured_mean"] = float(np.clip(ink, 0, 1.5).mean())
        out["ink_captured_lt90_frac"] = float((ink < 0.9).mean())
    return out


# ---------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    canvas = _CANVAS[args.distortion]
    tr_x, tr_y, ev_x, ev_y = split_digits(eval_on=args.eval, num_train=args.num_train,
                                          num_val=args.num_val)
    eval_key = jax.random.key(_VAL_SEED if args.eval == "val" else _TEST_SEED)
    ev_index = np.arange(ev_x.shape[0])
    ev_images, ev_params = distort(eval_key, ev_x, ev_index, args)
    ev_labels = ev_y.astype(np.int32)
    stats_idx = ev_index[:_STATS_IMAGES]
    digit_offset = digit_layer = None
    if args.distortion == "TC":
        digit_layer, _ = distort(eval_key, ev_x, ev_index, args, clutter=False)
        digit_offset = ev_params["digit_offset_px"][stats_idx]
        digit_layer = digit_layer[stats_idx]

    if args.st_downsample is None:
        args.st_downsample = 1 if args.distortion == "TC" else 2
    root = jax.random.key(args.seed)
    init_key, distort_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
    model = models.create_model(args.model, transform="affine", input_shape=(canvas, canvas, 1),
                                st_downsample=args.st_downsample, rngs=nnx.Rngs(init_key))
    num_params = models.count_params(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    tx = make_optimizer(args)
    opt_state = tx.init(params)

    def loss_fn(p, batch):
        logits = nnx.merge(graphdef, p, rest)(batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    @jax.jit
    def train_step(p, o, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    @jax.jit
    def logits_fn(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    @jax.jit
    def transform_fn(p, x):
        return nnx.merge(graphdef, p, rest).spatial_transform(x)

    def error_pct(p):
        wrong = 0
        for s in range(0, len(ev_labels), 500):
            logits = logits_fn(p, ev_images[s:s + 500])
            wrong += int(np.sum(np.argmax(np.asarray(logits), -1) != ev_labels[s:s + 500]))
        return 100.0 * wrong / len(ev_labels)

    def stats(p):
        _, theta, grid = jax.device_get(transform_fn(p, ev_images[stats_idx]))
        return theta_stats(theta, grid, digit_offset, digit_layer, canvas)

    def picture(p, step, err):
        try:  # Optional: the loop's renderer, if it is importable in this tree.
            from stn_jax.train import pictures
        except ImportError:
            return
        idx = np.unique(np.linspace(0, len(ev_labels) - 1, 16).round().astype(int))
        out, _, grid = jax.device_get(transform_fn(p, ev_images[idx]))
        pred = np.argmax(np.asarray(logits_fn(p, ev_images[idx])), -1)
        pic = pictures.render(ev_images[idx], labels=ev_labels[idx], predictions=pred,
                              outputs=out, grids=grid,
                              title=f"step {step}: {args.eval} error {err:.2f}%")
        pictures.save_png(pic, os.path.join(args.out, "pictures", f"step_{step:06d}.png"))

    is_st = args.model.startswith("st_")
    curve, theta_curve, losses = [], [], []
    if is_st:
        theta_curve.append({"step": 0, **stats(params)})
    t_train = time.time()
    for step in range(args.steps):
        batch = train_batch(step, tr_x, tr_y, args, distort_key)
        params, opt_state, loss = train_step(params, opt_state, batch)
        losses.append(loss)
        done = step + 1
        if is_st and (done % args.stats_every == 0 or done == args.steps):
            theta_curve.append({"step": done, **stats(params)})
            print(f"step {done}: {time.time() - t_train:.0f} s, theta "
                  + ", ".join(f"{k} {v:.3g}" for k, v in theta_curve[-1].items() if k != "step"),
                  flush=True)
        elif done % args.stats_every == 0:
            print(f"step {done}: {time.time() - t_train:.0f} s", flush=True)
        if done % args.eval_every == 0 or done == args.steps:
            err = error_pct(params)
            loss_mean = float(np.mean(jax.device_get(losses[-args.eval_every:])))
            curve.append({"step": done, "error_pct": err, "train_loss": loss_mean,
                          "elapsed_s": time.time() - t_train})
            print(f"step {done}: {args.eval} error {err:.2f}%, train loss {loss_mean:.4f}, "
                  f"{time.time() - t_train:.0f} s", flush=True)
            if is_st:
                picture(params, done, err)
    result = {
        f"{args.eval}_error_pct": curve[-1]["error_pct"],
        "num_eval": int(len(ev_labels)),
        "num_train_digits": int(tr_x.shape[0]),
        "num_params": num_params,
        "curve": curve,
        "theta": theta_curve,
        "train_wall_s": time.time() - t_train,
        "wall_s": time.time() - start,
        "args": vars(args),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
