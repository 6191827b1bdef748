"""Checks, without a GPU, the index and bit arithmetic of crates/dsv4-cuda/kernels/gemm_tc.cu:

1. the ldmatrix / mma.sync m16n8k16 fragment addressing of `tc_step` and the accumulator-to-
   output mapping of the epilogues (`tc_row`, `tc_tok`), emulated from the PTX ISA's fragment
   layouts for one block tile (dense and gated MoE tiles), against a plain product;
2. `e4m3x4_to_bf16` (all 255 finite e4m3 codes) and `e2m1x8_to_bf16` (every nibble at every
   position, and random words), emulating prmt.

Run: python3 tools/check_tc_kernels.py  (pure Python, a second or two).
"""
import random
import struct


def ldsm(addr, mat):
    """ldmatrix .x4: lane L gets, from matrix j (rows addressed by lanes 8j..8j+7), the pair at
    row L/4, columns 2(L%4), +1."""
    out = []
    for lane in range(32):
        regs = []
        for j in range(4):
            r, c = addr(j * 8 + lane // 4)
            regs.append((mat[r][c + 2 * (lane % 4)], mat[r][c + 2 * (lane % 4) + 1]))
        out.append(regs)
    return out


def mma(acc, a, b, b0, b1):
    """acc (per lane c0..c3) += A (16x16 from a0..a3) * B (16x8 from b regs b0, b1)."""
    am = [[0] * 16 for _ in range(16)]
    bm = [[0] * 8 for _ in range(16)]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for e in range(2):
            am[g][2 * t + e] = a[lane][0][e]
            am[g + 8][2 * t + e] = a[lane][1][e]
            am[g][8 + 2 * t + e] = a[lane][2][e]
            am[g + 8][8 + 2 * t + e] = a[lane][3][e]
            bm[2 * t + e][g] = b[lane][b0][e]
            bm[8 + 2 * t + e][g] = b[lane][b1][e]
    c = [[sum(am[r][k] * bm[k][n] for k in range(16)) for n in range(8)] for r in range(16)]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        acc[lane][0] += c[g][2 * t]
        acc[lane][1] += c[g][2 * t + 1]
        acc[lane][2] += c[g + 8][2 * t]
        acc[lane][3] += c[g + 8][2 * t + 1]


def check_tile(bn, bk, gated):
    bm = 128
    a_s = [[random.randint(-3, 3) for _ in range(bk)] for _ in range(bm)]
    x_s = [[random.randint(-3, 3) for _ in range(bk)] for _ in range(bn)]
    nt, tg, ks = bn // 16, min(bn // 16, 4), bk // 16
    res = {}
    for warp in range(8):
        wm, wn = warp & 3, warp >> 2
        m = [wm * 16, 64 + wm * 16] if gated else [wm * 32, wm * 32 + 16]
        acc = [[[[0] * 4 for _ in range(32)] for _ in range(nt)] for _ in range(2)]
        a = [[ldsm(lambda l, i=i, h=h: (m[i] + (l & 15), 16 * h + (l >> 4) * 8), a_s)
              for i in range(2)] for h in range(ks)]
        for g in range(0, nt, tg):
            n0 = wn * (bn // 2) + g * 8
            for h in range(ks):
                for jp in range(tg // 2):
                    b = ldsm(lambda l: (n0 + jp * 16 + (l & 7) + (l >> 4) * 8,
                                        16 * h + ((l >> 3) & 1) * 8), x_s)
                    for i in range(2):
                        mma(acc[i][g + 2 * jp], a[h][i], b, 0, 1)
                        mma(acc[i][g + 2 * jp + 1], a[h][i], b, 2, 3)
        for i in range(2):
            for j in range(nt):
                for lane in range(32):
                    for e in range(4):
                        row = (lane >> 2) + (e >> 1) * 8  # tc_row
                        tok = wn * (bn // 2) + j * 8 + 2 * (lane & 3) + (e & 1)  # tc_tok
                        srow = (wm * 16 + row + 64 * i) if gated else (wm * 32 + i * 16 + row)
                        assert (srow, tok) not in res
                        res[(srow, tok)] = acc[i][j][lane][e]
    assert len(res) == bm * bn
    for (r, t), v in res.items():
        assert v == sum(a_s[r][k] * x_s[t][k] for k in range(bk)), (r, t)
    print(f"fragments: {bn} tokens, K step {bk}, {'gated' if gated else 'dense'}: ok")


def bf16_val(b):
    return struct.unpack("<f", struct.pack("<I", (b & 0xFFFF) << 16))[0]


def e4m3(b):
    s = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 15, b & 7
    return s * (m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


def f16_bits(v):
    return struct.unpack("<H", struct.pack("<e", v))[0]


def check_e4m3():
    codes = [b for b in range(256) if b & 0x7F != 0x7F]
    for b in codes:
        for other in random.sample(codes, 8) + [b]:
            h = f16_bits(e4m3(b)) | (f16_bits(e4m3(other)) << 16)
            p = ((h >> 3) & 0x0FFF0FFF) | (h & 0x80008000)
            assert bf16_val(p) == e4m3(b) * 2.0**-112, (b, other)
            assert bf16_val(p >> 16) == e4m3(other) * 2.0**-112, (b, other)
    print("e4m3x4_to_bf16: ok")


def prmt(a, b, c):
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    d = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = src[sel & 7]
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        d |= byte << (8 * i)
    return d


def e2m1x8(w):
    lo_a, lo_b, hi_a, hi_b = 0xC0800000, 0xC0804000, 0x3F3F3F00, 0x40404040
    mag = w & 0x77777777
    l0, l1 = prmt(lo_a, lo_b, mag), prmt(lo_a, lo_b, mag >> 16)
    h0, h1 = prmt(hi_a, hi_b, mag), prmt(hi_a, hi_b, mag >> 16)
    t, u = (w << 4) & 0x80808080, w & 0x80808080
    h0 |= prmt(t, u, 0x5140)
    h1 |= prmt(t, u, 0x7362)
    return [prmt(l0, h0, 0x5140), prmt(l0, h0, 0x7362), prmt(l1, h1, 0x5140), prmt(l1, h1, 0x7362)]


def check_e2m1():
    e2m1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    words = [random.getrandbits(32) for _ in range(20000)]
    for n in range(16):
        for pos in range(8):
            words.append(n << (4 * pos))
            words.append((n << (4 * pos)) | (random.getrandbits(32) & ~(15 << (4 * pos)) & 0xFFFFFFFF))
    for w in words:
        p = e2m1x8(w)
        for k in range(8):
            nib = (w >> (4 * k)) & 15
            want = (-1.0 if nib & 8 else 1.0) * e2m1[nib & 7]
            assert bf16_val(p[k // 2] >> (16 * (k % 2))) == want, (hex(w), k)
    print("e2m1x8_to_bf16: ok")


if __name__ == "__main__":
    random.seed(1)
    check_tile(64, 64, True)
    check_tile(64, 32, False)
    check_tile(128, 64, False)
    check_tile(128, 32, False)
    check_e4m3()
    check_e2m1()
