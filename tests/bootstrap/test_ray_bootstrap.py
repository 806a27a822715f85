"""`bpo bootstrap` on a real local Ray cluster (2 CPUs, 2 replicas of the tiny LLaVA).

The oracle is the local run of the same config in this process: the Ray run's store must hold
the same files byte for byte (pairs, bad records, in the same order) and the same manifest, after
a clean run, after its driver is SIGKILLed part-way and rerun, and after one of its replicas is
killed mid-run and restarted by Ray. The data plants a malformed line and a corrupt image, so the
order of the reader's and the replicas' bad records is checked too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from bootstrap_helpers import config_for

from bpo.bootstrap.run import run_bootstrap
from bpo.data import read_manifest
from bpo.generate.ray_cluster import RayConfig
from bpo.models.load import load_from_config
from bpo.shapeworld.export import write_llava_dataset
from bpo.shapeworld.world import WorldConfig, sample_scene

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TWO_REPLICAS = RayConfig(replicas=2, cpus_per_replica=1)
# Fields of a manifest that say when and with what it was written, not what the store holds.
WHEN = ("created", "updated", "versions")


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """The session's local Ray cluster (2 CPUs); its address lets a subprocess join it."""
    return ray_cluster


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """10 ShapeWorld scenes as JSON Lines, with a malformed line 6 and a corrupt image on line 9."""
    folder = tmp_path_factory.mktemp("sw")
    world, rng = WorldConfig(), np.random.default_rng(0)
    path = write_llava_dataset([sample_scene(rng, world) for _ in range(10)], world, folder)
    lines = [json.dumps(record) + "\n" for record in json.loads(path.read_text())]
    lines.insert(5, '{"id": "oops", "conversations": [\n')
    corrupt = json.loads(lines[8])["id"]
    (folder / "images" / f"{corrupt}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = folder / "data.jsonl"
    out.write_text("".join(lines))
    return out


@pytest.fixture(scope="module")
def local(tmp_path_factory, tiny_llava_folder, data) -> Path:
    """The oracle: the store of the same config made in this process."""
    config = config_for(tiny_llava_folder, data, tmp_path_factory.mktemp("local") / "pairs")
    run_bootstrap(config, model_and_processor=load_from_config(config.model), progress=False)
    return Path(config.out)


def assert_same_store(got: Path, expected: Path) -> None:
    names = sorted(p.name for p in expected.iterdir() if not p.name.startswith("."))
    assert sorted(p.name for p in got.iterdir() if not p.name.startswith(".")) == names
    for name in names:
        if name != "manifest.json":
            assert (got / name).read_bytes() == (expected / name).read_bytes(), name
    manifest, reference = read_manifest(got), read_manifest(expected)
    for part in WHEN:
        del manifest[part], reference[part]
    assert manifest == reference
    assert manifest["complete"] is True


def pair_lines(store: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in store.glob("pairs-*.jsonl"))


def test_the_ray_run_writes_the_local_runs_store(cluster, tiny_llava_folder, data, local, tmp_path):
    config = config_for(tiny_llava_folder, data, tmp_path / "ray", ray=TWO_REPLICAS)
    run_bootstrap(config, progress=False)
    reference = read_manifest(local)
    # Both methods made pairs and both kinds of bad record are there: the comparison has teeth.
    assert set(reference["counts"]["by_source"]) == {"weaken", "inject"}
    assert {"malformed_json", "corrupt_image"} <= set(reference["bad_records"]["by_reason"])
    assert_same_store(tmp_path / "ray", local)


def test_a_sigkilled_ray_driver_rerun_writes_the_local_runs_store(
    cluster, tiny_llava_folder, data, local, tmp_path
):
    """The driver joins the module's cluster through RAY_ADDRESS, as a user's would."""
    out = tmp_path / "killed"
    config = config_for(tiny_llava_folder, data, out, ray=TWO_REPLICAS)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run": json.loads(json.dumps(config, default=vars))}))
    command = [sys.executable, "-m", "bpo.cli", "bootstrap", "--config", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": cluster}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while pair_lines(out) < 1:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no pairs within 120 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = pair_lines(out)
    assert read_manifest(out)["complete"] is False
    assert 0 < killed_at < read_manifest(local)["counts"]["pairs"]
    run_bootstrap(config, progress=False)  # the rerun, in this process, on the same cluster
    assert_same_store(out, local)


def replica_pids() -> list[int]:
    """Processes of this machine that run a Ray Data map actor (a model replica)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if entry.name.isdigit() and b"MapWorker" in command:
            pids.append(int(entry.name))
    return pids


def test_a_replica_killed_mid_run_is_restarted_without_duplicates(
    cluster, tiny_llava_folder, data, local, tmp_path
):
    out = tmp_path / "lost"
    config = config_for(tiny_llava_folder, data, out, ray=replace(TWO_REPLICAS, max_restarts=2))
    killed: list[int] = []

    def kill_a_replica_after_the_first_pairs() -> None:
        deadline = time.monotonic() + 120
        while pair_lines(out) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        pids = replica_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    killer = threading.Thread(target=kill_a_replica_after_the_first_pairs)
    killer.start()
    run_bootstrap(config, progress=False)
    killer.join()
    assert len(killed) == 1, "no replica process was found to kill"
    assert_same_store(out, local)
