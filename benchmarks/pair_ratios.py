"""Paired speed ratios from a ``round_speed.py --interleave --json`` file: for each method, the ratio of
its time to ``vmap``'s in each interleaved round (round i of every method ran back to back), reported as
median [min, max] over the pairs. ``python benchmarks/pair_ratios.py FILE.json [FILE.json ...]``."""
from __future__ import annotations

import json
import statistics
import sys


def pair_ratios(path: str, reference: str = "vmap") -> list[str]:
    rows = json.load(open(path))["main"]
    by = {r["method"]: r["times"] for r in rows}
    ref = by[reference]
    out = [f"{path}: {reference} median {statistics.median(ref):.3f} s over {len(ref)} rounds"]
    for m, times in by.items():
        if m == reference:
            continue
        ratios = [t / r for t, r in zip(times, ref)]   # > 1: the reference is faster
        out.append(f"  {reference} vs {m}: {statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}] "
                   f"({len(ratios)} pairs; {m} median {statistics.median(times):.3f} s)")
    return out


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print("\n".join(pair_ratios(p)))
