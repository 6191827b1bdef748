"""Checks, without a GPU, the index and bit arithmetic of crates/dsv4-cuda/kernels/moe_tc.cu:
one warp's 16 rows (`moe_tc_dot`) emulated lane by lane from the PTX ISA's mma.sync m16n8k16
fragment layouts — the e2m1 → f16 decode (`fp4x8_to_half2`, prmt emulated), the activation
planes of `moe_tc_prep` (per-group power-of-two scaling, two f16 parts), the block-diagonal
B operand and the fold's choice of weight scale byte and activation group factor per column —
against the plain f64 product, with every weight group and activation group at its own scale.
A wrong mapping gives errors of order 1; the emulation's own is the f16 split's (~1e-7).

Run: python3 tools/check_moe_tc.py  (pure Python, a few seconds).
"""
import random
import struct

from check_tc_kernels import mma, prmt  # the fragment and byte-permute emulations

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def f16(v):
    """v rounded to f16 (as a float)."""
    return struct.unpack("<e", struct.pack("<e", v))[0]


def h2f(bits):
    return struct.unpack("<e", struct.pack("<H", bits & 0xFFFF))[0]


def fp4x8_to_half2(w):
    """The kernel's decode: four half2 words (as float pairs) of 2^-14 × the nibbles' values."""
    odd = ((w >> 3) & 0x0E0E0E0E) | (w & 0x80808080)
    even = (((w << 1) & 0x0E0E0E0E) | ((w << 4) & 0x80808080)) & 0xFFFFFFFF
    words = [prmt(even, 0, 0x2404), even & 0xFF00FF00, prmt(odd, 0, 0x2404), odd & 0xFF00FF00]
    return [(h2f(v), h2f(v >> 16)) for v in words]


def check(K, seed):
    rnd = random.Random(seed)
    R = 16
    nib = [[rnd.randrange(16) for _ in range(K)] for _ in range(R)]
    sc = [[rnd.randrange(120, 134) for _ in range(K // 32)] for _ in range(R)]
    x = []
    for _ in range(K // 32):
        m = 2.0 ** rnd.randrange(-6, 7)
        x += [rnd.uniform(-1, 1) * m for _ in range(32)]
    val = [[(-1 if n >= 8 else 1) * E2M1[n & 7] for n in row] for row in nib]
    ref = [sum(val[r][k] * 2.0 ** (sc[r][k // 32] - 127) * x[k] for k in range(K)) for r in range(R)]
    # Rows as stored: byte b holds elements 2b (low nibble) and 2b + 1 (high nibble).
    packed = [bytes(row[2 * b] | (row[2 * b + 1] << 4) for b in range(K // 2)) for row in nib]
    word = lambda r, off: int.from_bytes(packed[r][off:off + 4], "little")
    # moe_tc_prep: planes[(G, part, i)] = the 4 half2 words of word i, gsc[G] = 2^(14 - sh).
    planes, gsc = {}, []
    for G in range(K // 32):
        grp = x[32 * G:32 * G + 32]
        amax = max(abs(v) for v in grp)
        e = struct.unpack("<I", struct.pack("<f", amax))[0] >> 23 & 0xFF
        sh = min(max(14 - (e - 127), -113), 127)
        y = [v * 2.0 ** sh for v in grp]
        hi = [f16(v) for v in y]
        lo = [f16(v - h) for v, h in zip(y, hi)]
        for p, part in enumerate([hi, lo]):
            for i in range(4):
                o = 8 * i
                planes[(G, p, i)] = [(part[o], part[o + 4]), (part[o + 2], part[o + 6]),
                                     (part[o + 1], part[o + 5]), (part[o + 3], part[o + 7])]
        gsc.append(2.0 ** (14 - sh))
    acc = [[0.0] * 4 for _ in range(32)]
    for stp in range(K // 256):
        for ng in range(2):
            D = [[0.0] * 4 for _ in range(32)]  # c0..c3 of each lane
            for i in range(4):
                for s2 in range(2):  # the two MMAs of word i
                    A, B = [], []
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        off = stp * 128 + 32 * t + 16 * ng + 4 * i
                        xa, xb = fp4x8_to_half2(word(g, off)), fp4x8_to_half2(word(g + 8, off))
                        j = 0 if s2 == 0 else 2
                        A.append([xa[j], xb[j], xa[j + 1], xb[j + 1]])
                        b = [(0.0, 0.0), (0.0, 0.0)]
                        if (g & 3) == t:  # the lanes that feed B's column g
                            w4 = planes[(stp * 8 + 2 * t + ng, g >> 2, i)]
                            b = [w4[j], w4[j + 1]]
                        B.append(b)
                    mma(D, A, B, 0, 1)
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                at = stp * 8 + 4 * (t & 1)
                swa = int.from_bytes(bytes(sc[g][at:at + 4]), "little")
                swb = int.from_bytes(bytes(sc[g + 8][at:at + 4]), "little")
                e8 = lambda w, j: 2.0 ** (((w >> (8 * j)) & 0xFF) - 127)
                ga = stp * 8 + 2 * ((2 * t) & 3) + ng
                gb = ga + 2
                d = D[lane]
                acc[lane][0] += d[0] * e8(swa, ng) * gsc[ga]
                acc[lane][1] += d[1] * e8(swa, 2 + ng) * gsc[gb]
                acc[lane][2] += d[2] * e8(swb, ng) * gsc[ga]
                acc[lane][3] += d[3] * e8(swb, 2 + ng) * gsc[gb]
    out = [0.0] * 16
    for lane in range(32):
        g = lane >> 2
        out[g] += acc[lane][0] + acc[lane][1]
        out[g + 8] += acc[lane][2] + acc[lane][3]
    return max(abs(o - r) for o, r in zip(out, ref)) / max(abs(r) for r in ref)


def check_decode():
    """fp4x8_to_half2 against the e2m1 table, every nibble at every position."""
    for pos in range(8):
        for n in range(16):
            w = n << (4 * pos)
            pairs = fp4x8_to_half2(w)
            # pairs are elements (0,4), (2,6), (1,5), (3,7)
            order = [0, 4, 2, 6, 1, 5, 3, 7]
            got = [v for p in pairs for v in p]
            want = (-1 if n >= 8 else 1) * E2M1[n & 7] * 2.0 ** -14
            for j, el in enumerate(order):
                expect = want if el == pos else 0.0
                assert got[j] == expect or (expect == 0 and got[j] == 0), (pos, n, j, got[j])


if __name__ == "__main__":
    check_decode()
    for K, seed in [(512, 1), (1024, 2)]:
        err = check(K, seed)
        print(f"K={K}: max error {err:.1e} of the rows' largest value")
        assert err < 1e-6, err
    print("moe_tc layout: ok")
