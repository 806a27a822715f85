"""The manifest's summaries of a bootstrap store, rebuilt from its files when a run closes.

Rejects per reason come from `bad_records.jsonl` and length distributions per source from the
shards, never from counters carried in memory across a kill. Lengths are kept as histograms, so
memory stays flat however many pairs the store holds.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from bpo.data import PairWriter, PreferencePair, read_bad_records, read_pairs

REJECT_PREFIX = "rejected_"  # the reason of a rejected negative: rejected_<source>_<why>


def _quantile(histogram: Counter, q: float) -> float:
    """Nearest-rank quantile of the values counted in `histogram`."""
    rank, seen = max(1, math.ceil(q * sum(histogram.values()))), 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value
    raise ValueError("empty histogram")


def _summary(histogram: Counter) -> dict[str, float]:
    total = sum(histogram.values())
    mean = sum(v * n for v, n in histogram.items()) / total
    return {
        "mean": round(mean, 4),
        "p50": _quantile(histogram, 0.5),
        "p90": _quantile(histogram, 0.9),
        "max": max(histogram),
    }


def length_stats(pairs: Iterable[PreferencePair]) -> dict[str, dict[str, Any]]:
    """Per source: pairs, and mean/p50/p90/max of chosen and rejected tokens and of their ratio.

    The ratio is rejected over chosen tokens, rounded to 0.01 (histograms keep memory flat).
    """
    hists: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for pair in pairs:
        if pair.chosen_tokens is None or pair.rejected_tokens is None:
            continue
        h = hists[pair.source]
        h["chosen_tokens"][pair.chosen_tokens] += 1
        h["rejected_tokens"][pair.rejected_tokens] += 1
        h["ratio"][round(pair.rejected_tokens / max(1, pair.chosen_tokens), 2)] += 1
    return {
        source: {"pairs": sum(h["ratio"].values()), **{k: _summary(v) for k, v in h.items()}}
        for source, h in sorted(hists.items())
    }


def finalize_stats(writer: PairWriter) -> None:
    """Rebuild the manifest's reject counts and length distributions from the store's files."""
    rejects = Counter(
        bad.reason
        for bad in read_bad_records(writer.out_dir)
        if bad.reason.startswith(REJECT_PREFIX)
    )
    for reason, n in rejects.items():
        writer.count(reason, n - writer.other_counts[reason])
    writer.stats["lengths"] = length_stats(read_pairs(writer.out_dir))
