#!/usr/bin/env python3
"""Where a kernel's warps wait, instruction by instruction: a summary of Nsight Compute's source
page (`ncu -i REPORT --page source --print-source sass --csv`, with the SourceCounters section
collected; scripts/consumer-lab.sh writes one per kernel).

    python3 tools/ncu_sass_stalls.py SOURCE.csv [top]

Prints the share of the warp-state samples per opcode, then the `top` instructions (default 30)
with the most samples, each with its largest stall reasons where the page has per-reason
columns. Column names differ between Nsight Compute versions, so they are found by pattern: the
SASS text ("Source"), the address, "Warp Stall Sampling (All Samples)" and any other column
holding "stall" in its name.
"""
import collections
import csv
import io
import sys


def num(x):
    try:
        return float(x.replace(",", ""))
    except (ValueError, AttributeError):
        return 0.0


def main():
    text = open(sys.argv[1]).read().splitlines()
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    # Skip ncu's own lines before the table (its header is the first line of quoted fields).
    start = next((i for i, line in enumerate(text) if line.startswith('"')), None)
    if start is None:
        sys.exit("no CSV table found")
    rows = list(csv.reader(io.StringIO("\n".join(text[start:]))))
    hdr, data = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
    low = [h.lower() for h in hdr]
    src = next((i for i, h in enumerate(low) if h == "source"), None)
    addr = next((i for i, h in enumerate(low) if h.startswith("address")), None)
    samp = next((i for i, h in enumerate(low) if "stall sampling" in h and "all" in h), None)
    if samp is None:
        samp = next((i for i, h in enumerate(low) if "sampling" in h), None)
    if src is None or samp is None:
        sys.exit(f"columns not found (source, samples) among: {hdr}")
    reasons = [i for i, h in enumerate(low) if "stall" in h and i != samp and "sampling" not in h]
    total = sum(num(r[samp]) for r in data) or 1.0
    print(f"{len(data)} instructions, {total:.0f} warp-state samples")
    by_op = collections.Counter()
    for r in data:
        op = r[src].split()
        op = op[1] if op and op[0].startswith("@") and len(op) > 1 else (op[0] if op else "")
        by_op[op.split(".")[0]] += num(r[samp])
    print("by opcode: " + "  ".join(f"{op} {100 * n / total:.1f}%" for op, n in by_op.most_common(12)))
    print()
    for r in sorted(data, key=lambda r: -num(r[samp]))[:top]:
        where = r[addr] if addr is not None else ""
        why = sorted(((num(r[i]), hdr[i]) for i in reasons), reverse=True)[:3]
        why = ", ".join(f"{h} {v:.0f}" for v, h in why if v > 0)
        print(f"{100 * num(r[samp]) / total:5.1f}%  {where:>8}  {r[src][:60]:60s}  {why}")


if __name__ == "__main__":
    main()
