#!/usr/bin/env python3
"""Where a decode step's time goes inside its CUDA graph, from tools/gpu/kernel_trace.cpp's CSV.

    python3 tools/ktrace_summary.py trace.csv [--timeline] [--layers] [--graph N]
    python3 tools/ktrace_summary.py trace.csv --eager

`--eager` sums the kernels launched outside graphs (a prefill's) instead: per name, launches,
busy time and its share of all eager kernels' busy time, and the span from the first start to
the last end.

Takes the graph with the most replays (or --graph N), splits it into steps at each `embed`
kernel and uses the median step. Per kernel name: launches per step, mean duration, and how the
step's span is shared out: a kernel's *advance* is how far its end pushes the latest end seen so
far (kernels sorted by start), its *gap* the idle time between that frontier and its start (no
kernel running: launch latency or a dependency wait that nothing overlaps). Advances plus gaps
add up to the step's span. `--layers` also prints each layer's advances in launch order (a layer
starts at every second `hc_boundary`; the six-launch boundary path is not split).
"""
import collections
import csv
import statistics
import sys


def short(name):
    return name.split("(")[0]


def main():
    path = sys.argv[1]
    timeline = "--timeline" in sys.argv
    layers = "--layers" in sys.argv
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            rows.append((int(r["start_ns"]), int(r["end_ns"]), int(r["graph_id"]), short(r["name"])))
    if "--eager" in sys.argv:
        return eager(rows)
    graphs = collections.Counter(g for _, _, g, n in rows if g and n.startswith("embed"))
    if not graphs:
        sys.exit("no graph replays with an embed kernel in the trace")
    gid = int(sys.argv[sys.argv.index("--graph") + 1]) if "--graph" in sys.argv else graphs.most_common(1)[0][0]
    ks = sorted(r for r in rows if r[2] == gid)
    steps, cur = [], []
    for k in ks:
        if k[3].startswith("embed") and cur:
            steps.append(cur)
            cur = []
        cur.append(k)
    steps.append(cur)
    steps = [s for s in steps if len(s) == len(steps[0])]
    spans = [max(e for _, e, _, _ in s) - s[0][0] for s in steps]
    med = sorted(range(len(steps)), key=lambda i: spans[i])[len(steps) // 2]
    step = steps[med]
    t0 = step[0][0]
    print(f"graph {gid}: {len(steps)} steps of {len(step)} kernels, span median {spans[med] / 1e3:.1f} us "
          f"(min {min(spans) / 1e3:.1f}, max {max(spans) / 1e3:.1f})")
    agg = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    frontier = t0
    gaps = 0.0
    per_layer, boundaries = [[]], 0
    if timeline:
        print(f"{'start':>8} {'dur':>7} {'gap':>6} {'adv':>6}  kernel")
    for s, e, _, n in step:
        gap = max(0, s - frontier)
        adv = max(0, e - max(frontier, s))
        frontier = max(frontier, e)
        a = agg[n]
        a[0] += 1
        a[1] += (e - s) / 1e3
        a[2] += adv / 1e3
        a[3] += gap / 1e3
        gaps += gap / 1e3
        if timeline:
            print(f"{(s - t0) / 1e3:8.1f} {(e - s) / 1e3:7.1f} {gap / 1e3:6.1f} {adv / 1e3:6.1f}  {n}")
        if n == "hc_boundary":
            if boundaries % 2 == 0:
                per_layer.append([])
            boundaries += 1
        per_layer[-1].append((n, (adv + gap) / 1e3))
    total = (frontier - t0) / 1e3
    if layers:
        for i, ks in enumerate(per_layer):
            name = "before layer 0" if i == 0 else f"layer {i - 1}"
            body = ", ".join(f"{n} {a:.1f}" for n, a in ks if a >= 0.05)
            print(f"{name}: {sum(a for _, a in ks):.1f} us | {body}")
    print(f"\n{'kernel':<40} {'n':>4} {'mean us':>8} {'advance':>8} {'gaps':>7} {'share':>6}")
    for n, (c, d, adv, gap) in sorted(agg.items(), key=lambda kv: -(kv[1][2] + kv[1][3])):
        print(f"{n[:40]:<40} {c:4d} {d / c:8.2f} {adv:8.1f} {gap:7.1f} {100 * (adv + gap) / total:5.1f}%")
    print(f"{'step span':<40} {'':4} {'':8} {total - gaps:8.1f} {gaps:7.1f} {total:.1f} us")
    print(f"median of per-step spans {statistics.median(spans) / 1e3:.1f} us")


def eager(rows):
    ks = sorted(r for r in rows if r[2] == 0)
    if not ks:
        sys.exit("no kernels outside graphs in the trace")
    busy = collections.defaultdict(lambda: [0, 0.0])
    for s, e, _, n in ks:
        busy[n][0] += 1
        busy[n][1] += (e - s) / 1e3
    total = sum(d for _, d in busy.values())
    span = (max(e for _, e, _, _ in ks) - ks[0][0]) / 1e3
    print(f"eager kernels: {len(ks)} launches, busy {total:.0f} us, span {span:.0f} us")
    print(f"\n{'kernel':<40} {'n':>6} {'mean us':>9} {'busy us':>10} {'share':>6}")
    for n, (c, d) in sorted(busy.items(), key=lambda kv: -kv[1][1]):
        print(f"{n[:40]:<40} {c:6d} {d / c:9.2f} {d:10.0f} {100 * d / total:5.1f}%")


if __name__ == "__main__":
    main()
