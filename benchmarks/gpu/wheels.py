"""The wheels the GPU verification run needs that the GPU machine's image lacks, downloaded here.

    python benchmarks/gpu/wheels.py --dest shared/wheels      # on this machine (pip reaches PyPI)

Nothing can be fetched on the GPU machine, and what travels with the working tree is capped at
64 MiB, so this downloads exactly what `benchmarks/gpu/verify.py` imports there that its image
(`GPU_IMAGE`, the package list of the lent machine) lacks: the `ROOTS` and, from the metadata of
the versions installed here, every requirement of theirs the image lacks too (`needed`), each at
the version installed here (the dry run's), as `--no-deps` wheels for CPython 3.12 on
manylinux x86-64. `OPTIONAL` packages (deepspeed, bitsandbytes) are added only when they have such
a wheel, it fits, and the image has everything it requires. The total must stay within
`--limit-mib` (60: the tree itself takes ~2 MiB); over it, nothing is kept and the helper says
what to drop. Then, on the GPU machine (the line the helper prints last):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site shared/wheels/*.whl && export PYTHONPATH=/tmp/site

bpo itself travels as the working tree: `verify.py` puts src/ on sys.path.
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The lent H200 machine's image ('cuda'), as read there on 2026-11-17 (.library/device/KINDS.md).
IMAGE_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
    psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
    triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
    wrapt xarray xxhash yarl zipp"""
GPU_IMAGE = frozenset(IMAGE_PACKAGES.split())
# What verify.py's parts import that the image lacks, and where.
ROOTS = {
    "trl": "train_throughput's TRL side (from trl import DPOTrainer, DPOConfig)",
    "httpx2": "bpo.endpoint, which bpo.bootstrap.config imports (the generation part)",
}
PINS = {"trl": "1.16.0"}  # the release docs/dpo-vs-trl.md compares with; others: as installed
# Optional: (what to ask pip for, why). A minimum version, or pip settles for any old wheel
# (PyPI's only deepspeed wheel is a 2020 dev build; releases are source-only).
OPTIONAL = {
    "deepspeed": ("deepspeed>=0.16", "accelerate_smoke's DeepSpeed ZeRO-2 launch"),
    "bitsandbytes": ("bitsandbytes>=0.45", "accelerate_smoke's QLoRA run"),
}
# Imported on the run's path when present, not required: anyio and httpcore2 fall back without
# sniffio; transformers' SmolVLM processor module (which bpo.models.tiny_families imports) without
# num2words, needed only to build a SmolVLM processor; kernels, which transformers 5.25 on
# requires and imports, and the image's transformers (5.17) neither requires nor imports.
IMPORTED_IF_PRESENT = {"sniffio", "num2words", "kernels"}
LIMIT_MIB = 60.0
# The GPU machine's Python, as `run` sees it there (KINDS.md: 3.12.3, x86-64).
MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
PIP_DOWNLOAD = [
    "download",
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    *(
        arg
        for tag in ("manylinux2014", "manylinux_2_24", "manylinux_2_28", "manylinux_2_34")
        for arg in ("--platform", f"{tag}_x86_64")
    ),
    "--implementation",
    "cp",
    "--no-deps",
    "--quiet",
]
# On the GPU machine: into a folder of their own, put on PYTHONPATH (.library/device/README.md).
INSTALL = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
    "--target /tmp/site {dest}/*.whl && export PYTHONPATH=/tmp/site"
)


@dataclass(frozen=True)
class Wheel:
    """One distribution to carry: its name, version and why the run needs it."""

    name: str
    version: str
    why: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


def normalize(name: str) -> str:
    """PEP 503's form of a distribution name: lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def required_names(lines: list[str]) -> list[str]:
    """The names of Requires-Dist entries whose markers hold on the GPU machine (no extras)."""
    from packaging.requirements import Requirement

    out = []
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(MARKERS):
            out.append(req.name)
    return out


def requirements(name: str) -> list[str]:
    """What `name`, as installed here, requires on the GPU machine."""
    return required_names(importlib.metadata.requires(name) or [])


def wheel_requirements(path: Path) -> list[str]:
    """What a downloaded wheel requires on the GPU machine (its METADATA's Requires-Dist)."""
    with zipfile.ZipFile(path) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(wheel.read(name).decode("utf-8"))
    return required_names(metadata.get_all("Requires-Dist") or [])


def installed_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"{name} is not installed here, so its version and requirements are unknown; "
            "install bpo's dev extra first (pip install -e '.[dev]')"
        ) from None


def needed(
    roots: dict[str, str] = ROOTS,
    image: frozenset[str] = GPU_IMAGE,
    requires: Callable[[str], list[str]] = requirements,
    version: Callable[[str], str] = installed_version,
) -> list[Wheel]:
    """The roots and their requirements, transitively, that `image` lacks (a requirement the
    image has is taken as met there, with its own requirements)."""
    have = {normalize(n) for n in image}
    found: dict[str, Wheel] = {}
    todo = [(name, why) for name, why in roots.items()]
    while todo:
        name, why = todo.pop(0)
        key = normalize(name)
        if key in have or key in found:
            continue
        found[key] = Wheel(key, PINS.get(key) or version(name), why)
        todo += [(dep, f"needed by {key}") for dep in requires(name)]
    return list(found.values())


def pip_download(spec: str, dest: Path) -> None:
    """`pip download` one wheel (no dependencies) for the GPU machine's Python into `dest`."""
    command = [sys.executable, "-m", "pip", *PIP_DOWNLOAD, "-d", str(dest), spec]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"pip found no cp312 manylinux x86-64 wheel of {spec}: {tail[0]}")


def mib(size: int) -> float:
    return size / 2**20


def fetch(spec: str, dest: Path, download: Callable[[str, Path], None]) -> list[Path]:
    """Download `spec` into `dest`; the wheel files it added."""
    before = set(dest.glob("*.whl"))
    download(spec, dest)
    return sorted(set(dest.glob("*.whl")) - before)


def collect(
    dest: Path,
    wheels: list[Wheel],
    optional: dict[str, tuple[str, str]] = OPTIONAL,
    download: Callable[[str, Path], None] = pip_download,
    limit_mib: float = LIMIT_MIB,
    image: frozenset[str] = GPU_IMAGE,
) -> tuple[list[tuple[Wheel, Path]], dict[str, str]]:
    """Download `wheels` (all or nothing) and each optional package that fits into `dest`.

    Returns (each wheel with its file, why each optional one was left out). Raises SystemExit
    naming the sizes when the required wheels alone exceed the limit.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):  # two versions of one package would stop the install
        old.unlink()
    got: list[tuple[Wheel, Path]] = []
    for wheel in wheels:
        got += [(wheel, path) for path in fetch(wheel.spec, dest, download)]
    total = sum(path.stat().st_size for _, path in got)
    if mib(total) > limit_mib:
        listing = "; ".join(f"{w.spec} {mib(p.stat().st_size):.1f} MiB" for w, p in got)
        for _, path in got:
            path.unlink()
        raise SystemExit(
            f"the wheels come to {mib(total):.1f} MiB, over --limit-mib {limit_mib:g} (the "
            f"working tree travels too, 64 MiB in all): {listing}; drop a part's package from "
            "ROOTS in benchmarks/gpu/wheels.py or raise --limit-mib if the tree is small"
        )
    skipped = {}
    for name, (spec, why) in optional.items():
        trial = dest / f".trial-{name}"
        trial.mkdir(exist_ok=True)
        try:
            files = fetch(spec, trial, download)
            reason = _left_out(files, total, limit_mib, image)
            if reason:
                skipped[name] = reason
                continue
            for path in files:
                kept = path.rename(dest / path.name)
                got.append((Wheel(name, _version_of(kept), why), kept))
                total += kept.stat().st_size
        except RuntimeError as exc:
            skipped[name] = str(exc)
        finally:
            shutil.rmtree(trial, ignore_errors=True)
    return got, skipped


def _left_out(files: list[Path], total: int, limit_mib: float, image: frozenset[str]) -> str:
    """Why an optional package's wheels stay behind ("" if they go): too large, or needing
    packages the image lacks (its own requirements are not carried)."""
    size = sum(p.stat().st_size for p in files)
    if mib(total + size) > limit_mib:
        return (
            f"its wheel is {mib(size):.1f} MiB: {mib(total + size):.1f} MiB in all would exceed "
            f"{limit_mib:g}"
        )
    have = {normalize(n) for n in image}
    lacking = sorted({normalize(r) for p in files for r in wheel_requirements(p)} - have)
    return f"it needs {', '.join(lacking)}, which the GPU image lacks" if lacking else ""


def _version_of(path: Path) -> str:
    """A wheel file's version (name-version-...whl)."""
    return path.name.split("-")[1]


def report(
    got: list[tuple[Wheel, Path]], skipped: dict[str, str], dest: Path, limit_mib: float
) -> str:
    """The list with sizes, the total, the optional packages left out, the install command."""
    lines = [f"{'wheel':<58}{'MiB':>7}  why"]
    for wheel, path in got:
        lines.append(f"{path.name:<58}{mib(path.stat().st_size):7.2f}  {wheel.why}")
    total = sum(path.stat().st_size for _, path in got)
    lines.append(f"{'total':<58}{mib(total):7.2f}  (limit {limit_mib:g} MiB)")
    lines += [f"left out: {name}: {why}" for name, why in skipped.items()]
    lines.append("on the GPU machine: " + INSTALL.format(dest=dest))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default="shared/wheels", help="a git-ignored folder")
    parser.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    parser.add_argument("--no-optional", action="store_true", help="skip deepspeed, bitsandbytes")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    optional = {} if args.no_optional else OPTIONAL
    got, skipped = collect(dest, needed(), optional, limit_mib=args.limit_mib)
    print(report(got, skipped, dest, args.limit_mib))


if __name__ == "__main__":
    main()
