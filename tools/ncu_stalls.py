#!/usr/bin/env python3
"""Each kernel's largest warp stall reasons in an `ncu --csv --page raw --section WarpStateStats`
log (scripts/stall-reasons.sh): per kernel name, the mean over its launches of the warps
stalled per issued instruction, by reason, and its mean duration.

    python3 tools/ncu_stalls.py ncu-stalls.csv [top]
"""
import collections
import csv
import io
import re
import sys


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return None


lines = open(sys.argv[1]).read().splitlines()
top = int(sys.argv[2]) if len(sys.argv) > 2 else 6
start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
rows = list(csv.reader(io.StringIO("\n".join(l for l in lines[start:] if l.startswith('"')))))
hdr, data = rows[0], rows[2:]
ki = hdr.index("Kernel Name")
ti = hdr.index("gpu__time_duration.sum") if "gpu__time_duration.sum" in hdr else None
pat = re.compile(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")
reasons = [(i, m.group(1)) for i, h in enumerate(hdr) if (m := pat.match(h))]
if not reasons:
    sys.exit("no stall-reason columns in the log (was --section WarpStateStats given?)")
acc = collections.defaultdict(lambda: [0, 0.0, collections.Counter()])
for r in data:
    a = acc[r[ki].split("(")[0]]
    a[0] += 1
    if ti is not None and num(r[ti]) is not None:
        a[1] += num(r[ti]) / 1e3
    for i, name in reasons:
        v = num(r[i])
        if v:
            a[2][name] += v
print(f"{'kernel':28s} {'n':>3s} {'us':>7s}  stalls per issued instruction (largest first)")
for name, (n, t, c) in sorted(acc.items(), key=lambda x: -x[1][1]):
    s = "  ".join(f"{k} {v / n:.2f}" for k, v in c.most_common(top))
    print(f"{name:28s} {n:3d} {t / n:7.1f}  {s}")
