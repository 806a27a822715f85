"""`bpo bootstrap` on Ray vs in one process, side by side in one run, on the tiny LLaVA.

Every side runs `bpo.bootstrap.run.run_bootstrap` on the same ShapeWorld data and config
(weakened negatives sampled by the tiny LLaVA, lexical rewrites), each into its own store:
- local, 1 thread: the model in this process, torch on one thread;
- local, N threads: the same with torch on `--cpus` threads (the one-machine alternative);
- Ray: a local Ray cluster of `--cpus` CPUs, `--cpus` replicas of one CPU each.
The script asserts the stores hold the same pair files byte for byte, so the comparison is like
for like. The Ray side's time includes starting its replicas (each imports torch and loads the
model) and is reported with the cluster's own start-up (`ray.init`) apart.

Run: python benchmarks/ray_throughput.py   (prints samples/s of each side and the ratios;
options: --scenes 24 --max-new-tokens 32 --cpus 2)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bpo.bootstrap.config import BootstrapConfig, InjectConfig, WeakenConfig
from bpo.bootstrap.run import run_bootstrap
from bpo.data import read_llava
from bpo.generate.ray_cluster import RayConfig
from bpo.models.config import ModelConfig
from bpo.models.tiny import TinyLlavaConfig, build_tiny_llava, save_tiny_llava
from bpo.shapeworld.export import write_llava_dataset
from bpo.shapeworld.world import WorldConfig, caption, sample_scene

COMMAND = "python benchmarks/ray_throughput.py"


def make_inputs(folder: Path, scenes: int) -> tuple[Path, Path]:
    """(tiny LLaVA folder, LLaVA data file of `scenes` ShapeWorld scenes)."""
    world, rng = WorldConfig(), np.random.default_rng(0)
    scene_list = [sample_scene(rng, world) for _ in range(scenes)]
    texts = [caption(scene) for scene in scene_list] * 2
    texts.append("Describe the image. What shapes are in the image? yes no")
    model, processor = build_tiny_llava(texts, TinyLlavaConfig(), seed=0)
    model_dir = save_tiny_llava(model, processor, folder / "tiny_llava", TinyLlavaConfig())
    return model_dir, write_llava_dataset(scene_list, world, folder / "data")


def side(name: str, config: BootstrapConfig, samples: int) -> dict:
    started = time.perf_counter()
    manifest = run_bootstrap(config, progress=False)
    seconds = time.perf_counter() - started
    rate = samples / seconds
    print(
        f"{name:<26} {seconds:7.1f} s  {rate:6.2f} samples/s  {manifest['counts']['pairs']} pairs"
    )
    return {"seconds": seconds, "rate": rate}


def pair_files(store: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(store).glob("pairs-*.jsonl"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="Ray replicas / local torch threads")
    args = parser.parse_args()
    import ray

    folder = Path(tempfile.mkdtemp(prefix="bpo-ray-bench-"))
    model_dir, data = make_inputs(folder, args.scenes)
    base = BootstrapConfig(
        model=ModelConfig(str(model_dir), dtype="float32", device="cpu"),
        data=str(data),
        weaken=WeakenConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=3),
        inject=InjectConfig(kind="lexical", vocabulary="shapeworld", seed=5),
        batch_size=8,
        chunk_size=8,
    )
    samples = sum(1 for _ in read_llava(data))
    print(
        f"{COMMAND} --scenes {args.scenes} --max-new-tokens {args.max_new_tokens} "
        f"--cpus {args.cpus}"
    )
    print(
        f"{samples} samples, ray {ray.__version__}, torch {torch.__version__}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    results = {}
    for threads in (1, args.cpus):
        torch.set_num_threads(threads)
        config = BootstrapConfig(**{**vars(base), "out": str(folder / f"local{threads}")})
        results[f"local{threads}"] = side(f"local, {threads} thread(s)", config, samples)
    torch.set_num_threads(1)
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    print(f"{'ray.init (local cluster)':<26} {time.perf_counter() - started:7.1f} s")
    ray_config = RayConfig(replicas=args.cpus, cpus_per_replica=1)
    config = BootstrapConfig(**{**vars(base), "out": str(folder / "ray"), "ray": ray_config})
    results["ray"] = side(f"ray, {args.cpus} replicas x 1 CPU", config, samples)
    ray.shutdown()
    assert pair_files(str(folder / "ray")) == pair_files(str(folder / "local1")), "stores differ"
    # Torch on more threads may sum in another order, so this one is reported, not asserted.
    same = pair_files(str(folder / f"local{args.cpus}")) == pair_files(str(folder / "local1"))
    print(f"local, {args.cpus} threads, same pairs as 1 thread: {same}")
    for name in ("local1", f"local{args.cpus}"):
        ratio = results["ray"]["rate"] / results[name]["rate"]
        print(f"ray / {name}: {ratio:.2f}x samples/s")
    print(f"ray and local (1 thread) stores equal byte for byte; inputs and stores in {folder}")


if __name__ == "__main__":
    main()
