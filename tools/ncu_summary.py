#!/usr/bin/env python3
"""Per-kernel totals of the last decode step in an `ncu --csv --page raw` log.

    ncu --csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum \
        dsv4 bench --device cuda --layers 4 --prompts 0 --contexts 1024 --decode 1 > ncu.csv
    python3 tools/ncu_summary.py ncu.csv

ncu serializes kernels, flushes caches between them and fixes clocks, so small kernels look
slower than in a graph replay: read the table for shares and bandwidths, not step times.
"""
import collections
import csv
import io
import sys


def num(x):
    return float(x.replace(",", ""))


lines = open(sys.argv[1]).read().splitlines()
start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
rows = list(csv.reader(io.StringIO("\n".join(l for l in lines[start:] if l.startswith('"')))))
hdr, data = rows[0], rows[2:]
ki, ti, di = (hdr.index(k) for k in ("Kernel Name", "gpu__time_duration.sum", "dram__bytes_read.sum"))
last = max(i for i, r in enumerate(data) if r[ki].startswith("embed"))
tot = collections.defaultdict(lambda: [0, 0.0, 0.0])
for r in data[last:]:
    a = tot[r[ki].split("(")[0]]
    a[0] += 1
    a[1] += num(r[ti]) / 1e3
    a[2] += num(r[di])
T = sum(a[1] for a in tot.values())
B = sum(a[2] for a in tot.values())
print(f"{len(data) - last} kernels, {T:.0f} us, {B / 1e6:.0f} MB read from DRAM")
print(f"{'kernel':32s} {'n':>4s} {'us':>9s} {'MB':>9s} {'GB/s':>7s}")
for name, (c, t, d) in sorted(tot.items(), key=lambda x: -x[1][1]):
    print(f"{name:32s} {c:4d} {t:9.1f} {d / 1e6:9.1f} {d / t / 1e3 if t else 0:7.0f}")
