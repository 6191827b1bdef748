#!/usr/bin/env python3
"""A kernel's static instruction schedule from `cuobjdump -sass` output (sm_90: 128-bit words).

Each instruction's control bits (bits 105-125 of its word) hold what ptxas scheduled: the stall
cycles before the warp may issue its next instruction, the yield hint, the scoreboard it sets
for a variable-latency result (write / read) and the scoreboards it waits on. Without a GPU this
says how many instructions and how many scheduled cycles a loop's path costs one warp, which
instructions ptxas treats as variable-latency (they set a scoreboard) and where a warp waits.

  tools/sass_sched.py SASS [--kernel NAME] [--top N] [--sum LO:HI] [--list LO:HI]

Prints per kernel: its instruction count, the opcode mix, and its largest basic blocks (a
stage's unrolled math is one) with their instructions, the sum of their stall cycles, their
scoreboard waits, their opcode mix and the variable-latency instructions (those that set a
scoreboard). `--sum LO:HI` totals an address range; `--list LO:HI` lists it with the bits.
(scripts/sass.sh compiles a kernel file and runs this on the kernels it names.)
"""
import argparse
import collections
import re
import sys

INSN = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\*\s*(0x[0-9a-f]+)\s*\*/")
HIGH = re.compile(r"\s*/\*\s*(0x[0-9a-f]+)\s*\*/\s*$")
FUNC = re.compile(r"\s*Function\s*:\s*(\S+)")
BRANCH = re.compile(r"(?:^|\s)BRA(?:\.\S+)?\s+(?:.*,\s*)?(0x[0-9a-f]+)")


class Insn:
    def __init__(self, addr, text, high):
        self.addr = addr
        self.text = text
        ctrl = high >> 41
        self.stall = ctrl & 0xF
        self.yld = (ctrl >> 4) & 1
        self.wbar = (ctrl >> 5) & 7  # 7: none
        self.rbar = (ctrl >> 8) & 7
        self.wait = (ctrl >> 11) & 0x3F
        body = text.split(None, 1)
        if body and body[0].startswith("@"):  # a predicate guard
            body = body[1].split(None, 1) if len(body) > 1 else []
        self.op = body[0].split(".")[0] if body else ""

    def bits(self):
        wb = "-" if self.wbar == 7 else str(self.wbar)
        rb = "-" if self.rbar == 7 else str(self.rbar)
        wait = ",".join(str(i) for i in range(6) if self.wait >> i & 1) or "-"
        return f"stall {self.stall:2d} yield {self.yld} set w{wb} r{rb} wait {wait}"


def parse(lines):
    """{kernel: [Insn]} from cuobjdump's listing (each instruction's second word on the next line)."""
    kernels, cur, pending = {}, None, None
    for line in lines:
        m = FUNC.match(line)
        if m:
            cur = kernels.setdefault(m.group(1), [])
            continue
        m = INSN.match(line)
        if m and cur is not None:
            pending = (int(m.group(1), 16), m.group(2))
            continue
        m = HIGH.match(line)
        if m and pending is not None:
            cur.append(Insn(pending[0], pending[1], int(m.group(1), 16)))
            pending = None
    return kernels


def mix(insns, top=10):
    c = collections.Counter(i.op for i in insns)
    return " ".join(f"{op}×{n}" for op, n in c.most_common(top))


def blocks(insns):
    """Basic blocks: [first, last] index ranges split at branch targets and after branches."""
    addrs = {i.addr: k for k, i in enumerate(insns)}
    leaders = {0}
    for k, i in enumerate(insns):
        m = BRANCH.search(i.text)
        if m and int(m.group(1), 16) in addrs:
            leaders.add(addrs[int(m.group(1), 16)])
        if i.op in ("BRA", "EXIT", "RET", "BRX", "JMP") and k + 1 < len(insns):
            leaders.add(k + 1)
    starts = sorted(leaders)
    return [(a, b - 1) for a, b in zip(starts, starts[1:] + [len(insns)])]


def summary(body):
    varlat = collections.Counter(i.op for i in body if i.wbar != 7)
    line = (
        f"{len(body)} instructions, {sum(i.stall for i in body)} scheduled cycles, "
        f"{sum(1 for i in body if i.wait)} scoreboard waits\n      mix: {mix(body)}"
    )
    if varlat:
        line += "\n      set scoreboards: " + " ".join(f"{k}×{v}" for k, v in varlat.most_common())
    return line


def report(name, insns, top):
    print(f"== {name}: {len(insns)} instructions")
    print(f"   mix: {mix(insns, 14)}")
    big = sorted(blocks(insns), key=lambda r: r[0] - r[1])[:top]
    for a, b in sorted(big):
        print(f"   block {insns[a].addr:05x}-{insns[b].addr:05x}: {summary(insns[a : b + 1])}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sass", help="cuobjdump -sass output, or - for standard input")
    ap.add_argument("--kernel", action="append", help="only kernels whose names contain this (repeatable)")
    ap.add_argument("--list", help="LO:HI (hex addresses): list those instructions with their bits")
    ap.add_argument("--sum", help="LO:HI (hex addresses): the totals of that range (a path laid out in order)")
    ap.add_argument("--top", type=int, default=8, help="largest basic blocks to show (default 8)")
    a = ap.parse_args()
    lines = (sys.stdin if a.sass == "-" else open(a.sass)).read().splitlines()
    kernels = parse(lines)
    if not kernels:
        sys.exit("no instructions found: is this cuobjdump -sass output of an sm_70+ cubin?")
    for name, insns in kernels.items():
        if a.kernel and not any(k in name for k in a.kernel):
            continue
        if a.sum:
            lo, hi = (int(x, 16) for x in a.sum.split(":"))
            print(f"== {name} {lo:05x}-{hi:05x}: {summary([i for i in insns if lo <= i.addr < hi])}")
        elif a.list:
            lo, hi = (int(x, 16) for x in a.list.split(":"))
            print(f"== {name}")
            for i in insns:
                if lo <= i.addr < hi:
                    print(f"{i.addr:05x}  {i.text[:56]:56s}  {i.bits()}")
        else:
            report(name, insns, a.top)


if __name__ == "__main__":
    main()
