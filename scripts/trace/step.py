#!/usr/bin/env python3
"""One training step of a cupti_trace.cpp CSV: every kernel's start (us from the step's
first kernel), duration, stream and a short name. Steps are cut after each run of AdamW
update kernels (the optimizer ends a step).
Usage: step.py TRACE.csv [STEP]   (no STEP: the step durations only)"""
import re
import sys


def short(name):
    if name.startswith(("nccl", "memcpy")):
        return name[:44]
    if name.startswith("nvjet"):
        return "gemm " + name[12:40]
    for pattern in (r"GLOBAL__N__\w+?_\d+(\w+?)(?:I|E)", r"experts_gpu\d+(\w+?)I",
                    r"flashmoe\d+(\w+?)I", r"radix_sort\d+(\w+?)I", r"scan\d+(\w+?)I",
                    r"cublasLt\d+(\w+?)I", r"(nccl\w+)"):
        match = re.search(pattern, name)
        if match:
            return match.group(1)[:44]
    return name[:44]


def main():
    events = []
    with open(sys.argv[1]) as f:
        for line in f:
            start, end, stream, _, name = line.rstrip("\n").split(",", 4)
            events.append((int(start), int(end), int(stream), short(name)))
    events.sort()
    updates = [i for i, e in enumerate(events) if "adamw_update" in e[3]]
    starts = [a + 1 for a, b in zip(updates, updates[1:] + [len(events)]) if b - a > 50]
    durations = [(events[b][0] - events[a][0]) / 1e3 for a, b in zip(starts, starts[1:])]
    print("steps", len(durations), "us:", [round(d) for d in durations])
    if len(sys.argv) > 2:
        k = int(sys.argv[2])
        first, last = starts[k], starts[k + 1]
        t0 = events[first][0]
        for start, end, stream, name in events[first:last]:
            print(f"{(start - t0) / 1e3:9.1f} {(end - start) / 1e3:7.1f}  s{stream:<3} {name}")


if __name__ == "__main__":
    main()
