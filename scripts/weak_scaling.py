#!/usr/bin/env python3
"""Weak-scaling efficiency from flashmoe-train logs, as docs/benchmarks.md reports it:
every tok/s that a P-GPU run logs after its first interval (the warm-up), divided by P
times the mean of the same repetition's one-GPU intervals. The one-GPU run of a
repetition varies by a few percent from one to the next, so each repetition is
compared with its own. Prints a Markdown table: per repetition and world size, the
range of tok/s and of efficiency.
Usage: weak_scaling.py LOG...   (each named train-<P>gpu-<repetition>.log)"""
import collections
import re
import sys

LOG_NAME = re.compile(r"train-(\d+)gpu-([^/]+)\.log$")
TOKENS_PER_SECOND = re.compile(r"\bstep \d+/\d+ \|.*?\| (\d+) tok/s")


def intervals(path):
    """The logged tok/s of a run, after the first interval."""
    with open(path) as f:
        rates = [int(m.group(1)) for m in map(TOKENS_PER_SECOND.search, f) if m]
    return rates[1:]


def main(paths):
    runs = collections.defaultdict(dict)  # repetition -> world size -> tok/s intervals
    for path in paths:
        name = LOG_NAME.search(path)
        if not name:
            sys.exit(f"{path}: expected a log named train-<P>gpu-<repetition>.log")
        rates = intervals(path)
        if not rates:
            sys.exit(f"{path}: no tok/s after the first logged step (too few steps?)")
        runs[name.group(2)][int(name.group(1))] = rates
    for rep, run in runs.items():
        if 1 not in run:
            sys.exit(f"repetition {rep}: no one-GPU log (train-1gpu-{rep}.log)")
    sizes = sorted({p for run in runs.values() for p in run if p > 1})
    header = ["repetition", "1 GPU (mean tok/s)"]
    for p in sizes:
        header += [f"{p} GPUs (tok/s)", f"1 → {p}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for rep in sorted(runs, key=lambda r: (len(r), r)):  # 2 before 10
        run = runs[rep]
        one = sum(run[1]) / len(run[1])
        row = [rep, f"{one:,.0f}"]
        for p in sizes:
            rates = run.get(p)
            if not rates:
                row += ["–", "–"]
                continue
            low, high = min(rates), max(rates)
            efficiency = [100 * rate / (p * one) for rate in (low, high)]
            row += [f"{low:,}-{high:,}", "{:.1f}-{:.1f}%".format(*efficiency)]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
