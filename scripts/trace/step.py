#!/usr/bin/env python3
"""One training step of a cupti_trace.cpp CSV: every kernel's start (us from the step's
first kernel), duration, stream and a short name. Steps are cut after each run of AdamW
update kernels (the optimizer ends a step). With --idle, instead: the main stream's
(the busiest stream's) busy and idle time in that step, the idle time by the kernel
that ended each wait (a wait for another rank, for SMs held by a side stream, or for
the launch), the time no kernel runs on any stream (the SMs idle: copies only, or
waits), by the kernel that ended it, and the busiest kernels. With --ranks, instead:
the step's events of this trace and of every other rank's given (cupti_trace.cpp's CSVs
of one job share one clock), times from this rank's step start, each rank's names
indented by its position after this one: when a rank waits, the copy or kernel of the
other rank that it waits for. A trace taken with TRACE_API=1 also has the host's CUDA
calls: --idle then also says how much of each idle time the GPU waited for the host,
that is, until the call that queued the kernel ending the wait had returned.
Usage: step.py TRACE.csv [STEP [--idle | --ranks OTHER.csv...]]
       (no STEP: the step durations only)"""
import collections
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


def gaps(events, queued):
    """events: (start, end, stream, name, correlation), sorted by start. The time before
    each event in which none of the events before it runs, and how often, by the name of
    the event that ended the gap; the part of that time before the host's call that queued
    the event returned (queued: correlation -> the call's end; empty without calls); and
    each name's busy time."""
    idle, waits, busy, host = (collections.Counter() for _ in range(4))
    running_until = events[0][0]
    for start, end, _, name, correlation in events:
        if start > running_until:
            idle[name] += start - running_until
            waits[name] += 1
            call_end = queued.get(correlation, running_until)
            host[name] += max(0, min(start, call_end) - running_until)
        running_until = max(running_until, end)
        busy[name] += end - start
    return idle, waits, busy, host


def print_idle(events, queued):
    """events: (start, end, stream, name, correlation) of one step, sorted by start;
    queued: correlation -> end of the host call that queued it."""
    def of_host(ns, text):  # nothing without the host's calls in the trace
        return text.format(ns / 1e3) if queued else ""

    main_stream = collections.Counter(e[2] for e in events).most_common(1)[0][0]
    idle, waits, busy, host = gaps([e for e in events if e[2] == main_stream], queued)
    step = max(e[1] for e in events) - events[0][0]
    print(f"step {step / 1e3:.0f} us, main stream s{main_stream} busy "
          f"{sum(busy.values()) / 1e3:.0f} us, idle {sum(idle.values()) / 1e3:.0f} us"
          + of_host(sum(host.values()), ", of which waiting for the host {:.0f} us"))
    for name, ns in idle.most_common(14):
        print(f"  idle {ns / 1e3:8.1f} us over {waits[name]:3d} waits before {name}"
              + of_host(host[name], " (host {:.1f})"))
    # Copies run no kernel: the SMs are idle while only they run.
    idle, waits, _, host = gaps([e for e in events if not e[3].startswith("memcpy")], queued)
    print(f"  no kernel on any stream: {sum(idle.values()) / 1e3:.0f} us"
          + of_host(sum(host.values()), ", of which waiting for the host {:.0f} us"))
    for name, ns in idle.most_common(8):
        print(f"    {ns / 1e3:8.1f} us over {waits[name]:3d} gaps before {name}"
              + of_host(host[name], " (host {:.1f})"))
    for name, ns in busy.most_common(12):
        print(f"  busy {ns / 1e3:8.1f} us  {name}")


def read(path):
    """A trace's GPU events (start, end, stream, short name, correlation), sorted by
    start, and its host calls' ends by correlation (empty without TRACE_API=1)."""
    events, queued = [], {}
    with open(path) as f:
        for line in f:
            start, end, stream, kind, correlation, name = line.rstrip("\n").split(",", 5)
            if kind == "A":
                queued[int(correlation)] = max(queued.get(int(correlation), 0), int(end))
            else:
                events.append((int(start), int(end), int(stream), short(name), int(correlation)))
    return sorted(events), queued


def print_ranks(step, paths):
    """Every event of the traces at `paths` in the window of `step` (this rank's)."""
    t0, t1 = step[0][0], max(e[1] for e in step)
    rows = [(e, 0) for e in step]
    for rank, path in enumerate(paths, 1):
        rows += [(e, rank) for e in read(path)[0] if t0 <= e[0] <= t1]
    for (start, end, stream, name, _), rank in sorted(rows):
        print(f"{(start - t0) / 1e3:9.1f} {(end - start) / 1e3:7.1f}  {rank} s{stream:<3} "
              f"{'  ' * 12 * rank}{name}")


def main():
    events, queued = read(sys.argv[1])
    updates = [i for i, e in enumerate(events) if "adamw_update" in e[3]]
    starts = [a + 1 for a, b in zip(updates, updates[1:] + [len(events)]) if b - a > 50]
    durations = [(events[b][0] - events[a][0]) / 1e3 for a, b in zip(starts, starts[1:])]
    if len(sys.argv) < 3:
        print("steps", len(durations), "us:", [round(d) for d in durations])
        return
    k = int(sys.argv[2])
    step = events[starts[k]:starts[k + 1]]
    if "--idle" in sys.argv[3:]:
        print_idle(step, queued)
        return
    if "--ranks" in sys.argv[3:]:
        print_ranks(step, sys.argv[sys.argv.index("--ranks") + 1:])
        return
    print("steps", len(durations), "us:", [round(d) for d in durations])
    t0 = step[0][0]
    for start, end, stream, name, _ in step:
        print(f"{(start - t0) / 1e3:9.1f} {(end - start) / 1e3:7.1f}  s{stream:<3} {name}")


if __name__ == "__main__":
    main()
