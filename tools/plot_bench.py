"""Plots `dsv4 bench --device cuda --csv FILE` output: decode tok/s against context length.

usage: python3 tools/plot_bench.py bench.csv out.png [title]
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["phase"] == "decode" and float(r["tok_s"] or 0) > 0]
fig, ax = plt.subplots(figsize=(6, 4))
# One line per batch size (the `tokens` column of decode rows).
for batch in sorted({int(r["tokens"]) for r in rows}):
    sel = [r for r in rows if int(r["tokens"]) == batch]
    ax.plot([int(r["context"]) for r in sel], [float(r["tok_s"]) for r in sel], marker="o",
            label=f"batch {batch}")
ax.legend()
ax.set_xscale("log", base=2)
ax.set_xlabel("context (tokens)")
ax.set_ylabel("decode tok/s (layers measured)")
ax.set_ylim(bottom=0)
ax.grid(True, alpha=0.3)
ax.set_title(sys.argv[3] if len(sys.argv) > 3 else "dsv4 decode vs context")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
