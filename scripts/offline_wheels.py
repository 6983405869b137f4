"""Prints how to bring stn_jax's missing dependencies, as wheels, to a machine without network.

Reads the project's requirements from ``pyproject.toml`` (``[project] dependencies``, plus the
extras named with ``--extras``), follows their own requirements through the distributions
installed here (``importlib.metadata``), evaluating environment markers for the target (CPython
``--python-version`` on Linux x86_64), and drops every package the target already has
(``--have``). What is left is printed as one ``pip download`` command, each package pinned to
the version installed here (the versions this project is tested with), followed by the install
steps on the target: the wheels into a side folder on ``PYTHONPATH``, then the project itself
with ``--no-deps``.

``--have`` is a file from the target: ``python3 -m pip list --format=freeze`` (name==version;
a package whose version there does not satisfy a requirement is brought too) or one name a
line. Without it, the packages of the CUDA image of the GPU machines this project is measured
on are assumed (``TARGET_IMAGE``, names only, as listed on 2026-11-17: jax with CUDA, flax,
optax, orbax-checkpoint, torch, absl-py, pillow... but not ml_collections, tensorboardX or
tensorflow-datasets).

The commands are printed, not run: download here, carry the folder, install there. See
``docs/performance.md``, "Accelerator report and offline setup".

Usage::

  python scripts/offline_wheels.py                            # for the known GPU image
  python scripts/offline_wheels.py --have freeze.txt --python-version 3.12 --extras test

Example output (the default target, abridged)::

  for p in array_record==0.8.6 ... ml_collections==1.1.0 ... tensorflow-datasets==4.9.10 ...; do
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 ... "$p" \\
    || python3 -m pip wheel --no-deps -w wheels "$p"
  done
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import pathlib
import re
import sys
import tomllib

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

_REPO = pathlib.Path(__file__).resolve().parents[1]

# Platform tags pip accepts for a manylinux x86_64 target (pip matches each tag exactly).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

# Packages of the GPU machines' CUDA image (names only), as listed on 2026-11-17.
TARGET_IMAGE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov
pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests
rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""


def target_environment(python_version: str) -> dict[str, str]:
    """PEP 508 marker values of CPython `python_version` (e.g. "3.12") on Linux x86_64."""
    if not re.fullmatch(r"3\.\d+", python_version):
        raise ValueError(f"python_version must look like 3.12, got {python_version!r}")
    return {"python_version": python_version, "python_full_version": python_version + ".0",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "os_name": "posix", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "platform_release": "",
            "platform_version": "", "implementation_version": python_version + ".0"}


def project_requirements(pyproject: pathlib.Path, extras: tuple[str, ...]) -> list[str]:
    """The requirement strings of [project] dependencies and the named optional extras."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"extras: {extra!r} is not an extra of {pyproject} "
                             f"(have {sorted(optional)})")
        reqs += optional[extra]
    return reqs


def read_have(path: str | None) -> dict[str, str | None]:
    """Canonical name -> version (None if unknown) of what the target already has."""
    if path is None:
        return {canonicalize_name(n): None for n in TARGET_IMAGE.split()}
    have = {}
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, version = line.partition("==")
        have[canonicalize_name(name.split()[0])] = version.strip() or None
    return have


def _satisfied(req: Requirement, have: dict[str, str | None]) -> bool:
    version = have.get(canonicalize_name(req.name), "missing")
    if version == "missing":
        return False
    return version is None or not req.specifier or req.specifier.contains(version,
                                                                          prereleases=True)


def needed_wheels(reqs: list[str], have: dict[str, str | None], env: dict[str, str]):
    """Walks the requirements; returns (pins, unpinned).

    pins: {canonical name: "Name==version"} to download, the version installed here.
    unpinned: requirement strings of packages the target needs that are not installed here.
    """
    pins, unpinned = {}, {}
    queue = [(Requirement(r), ()) for r in reqs]
    seen = set()
    while queue:
        req, _ = queue.pop()
        key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        on_target = _satisfied(req, have)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            if not on_target:
                unpinned[key[0]] = str(req)
            continue
        if not on_target:
            pins[key[0]] = f"{dist.metadata['Name']}=={dist.version}"
        for text in dist.requires or []:
            sub = Requirement(text)
            plain = sub.marker is None or sub.marker.evaluate({**env, "extra": ""})
            for_extras = sub.marker is not None and any(
                sub.marker.evaluate({**env, "extra": e}) for e in req.extras)
            # The target's copy came with its plain requirements; extras asked for here may
            # need more.
            if (plain and not on_target) or (for_extras and not plain):
                queue.append((sub, ()))
    return dict(sorted(pins.items())), dict(sorted(unpinned.items()))


def commands(pins: dict[str, str], python_version: str, folder: str) -> str:
    """The shell lines: download here (one package at a time, so that a package published
    only as source, such as promise, is built into a wheel here instead of stopping the rest),
    then install on the target."""
    platforms = " ".join(f"--platform {p}" for p in PLATFORMS)
    download = (
        f"mkdir -p {folder}\n"
        f"for p in {' '.join(pins.values())}; do\n"
        f"  python3 -m pip download --no-deps --only-binary=:all: --python-version "
        f"{python_version} --implementation cp {platforms} -d {folder} \"$p\" \\\n"
        f"  || python3 -m pip wheel --no-deps -w {folder} \"$p\"  # source only: a wheel "
        "built here (pure Python only)\n"
        "done")
    install = (
        f"# on the target, from the checkout, with {folder}/ carried into it:\n"
        f"python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "
        f"{folder}/*.whl\n"
        "export PYTHONPATH=/tmp/site\n"
        "python3 -m pip install --no-index --no-deps --no-build-isolation -e .\n"
        "# (scripts/accelerator_report.py needs none of this: it runs from the checkout as is)")
    return f"# here, with network:\n{download}\n{install}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--python-version", default="3.12", help="the target's Python (3.12)")
    p.add_argument("--have", default=None,
                   help="the target's `pip list --format=freeze` (or names, one a line)")
    p.add_argument("--extras", default="", help="comma-separated extras to bring too (test)")
    p.add_argument("--folder", default="wheels", help="where pip download puts the wheels")
    p.add_argument("--pyproject", default=str(_REPO / "pyproject.toml"))
    args = p.parse_args(argv)
    extras = tuple(filter(None, args.extras.split(",")))
    reqs = project_requirements(pathlib.Path(args.pyproject), extras)
    pins, unpinned = needed_wheels(reqs, read_have(args.have),
                                   target_environment(args.python_version))
    print(f"# {len(pins)} wheels the target lacks, for stn_jax"
          f"{'[' + ','.join(extras) + ']' if extras else ''} on CPython "
          f"{args.python_version}, Linux x86_64:")
    for pin in pins.values():
        print(f"#   {pin}")
    if unpinned:
        print("# needed there but not installed here (no version to pin; add them by hand):")
        for text in unpinned.values():
            print(f"#   {text}")
    print(commands(pins, args.python_version, args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
