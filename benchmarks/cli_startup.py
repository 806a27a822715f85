"""How long `bpo --help` takes from a fresh interpreter, and what dominates its imports.

Run: python benchmarks/cli_startup.py   (median of 5 runs of `bpo --help` and `bpo train --help`,
target < 1.5 s on an idle 2-core machine, then the ten slowest imports by `python -X importtime`)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

RUNS = 5
TARGET_S = 1.5
COMMAND = "import sys; from bpo.cli import run; sys.argv[0] = 'bpo'; run()"


def _seconds(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", COMMAND, *args], capture_output=True, check=True)
    return time.perf_counter() - started


def _slowest_imports(count: int = 10) -> list[tuple[int, str]]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import bpo.cli"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for line in result.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].strip()))
    return sorted(rows, reverse=True)[:count]


def main() -> None:
    for args in (["--help"], ["train", "--help"]):
        times = [_seconds(*args) for _ in range(RUNS)]
        median = statistics.median(times)
        verdict = "PASS" if median < TARGET_S else "FAIL"
        print(
            f"bpo {' '.join(args)}: median {median:.2f} s of {RUNS} "
            f"(min {min(times):.2f}, max {max(times):.2f}); target < {TARGET_S} s: {verdict}"
        )
    print("slowest imports of `import bpo.cli` (cumulative microseconds):")
    for micros, name in _slowest_imports():
        print(f"  {micros:>9}  {name}")


if __name__ == "__main__":
    main()
