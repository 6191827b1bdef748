#!/usr/bin/env python3
"""Reference fixtures for dsv4's `--numerics official` profile (NUMERICS.md §1–§3, in float32).

For two tiny random DeepSeek-V4 checkpoints (written with make_fixtures.py's writers: one in the
official FP8/FP4 layout, one in the transformers BF16 layout) this records what transformers 5.23
`DeepseekV4ForCausalLM` computes in float32 on CPU **with the official roundings patched in**:

  * window K=V rows (every layer): after kv_norm and RoPE, the nope channels [0, hd-rd) get an FP8
    e4m3 round trip with one power-of-two scale per 64 channels (amax floored at 1e-4); the rd
    rotary channels stay float32 (NUMERICS §2.1). Applied before the cache update, so the rounded
    row is this call's key/value and what HF's window cache holds.
  * main compressed entries (CSA and HCA): after pooling, kv_norm and RoPE at w*m, the same FP8
    round trip of the nope channels (§2.2), before they are appended to HF's entry cache.
  * indexer entries and indexer queries: after (pooling, kv_norm,) RoPE: Sylvester Hadamard over
    all index_head_dim channels scaled by n^-1/2, then an FP4 e2m1 round trip with one
    power-of-two scale per 32 (amax floored at 6*2^-126) (§2.3, §2.4). Scores are taken between
    the rotated, rounded vectors (the rotation is not undone).
  * act_quant variant only (§2.5): FP8 e4m3 round trip in blocks of 128 along the input dim (the
    last block is the remainder when the dim is not a multiple of 128) of the input of
    wq_a, wkv, wq_b, wo_b, indexer wq_b, shared w1/w3/w2 and routed w1/w3/w2; the routed expert's
    routing weight is multiplied into the SwiGLU output before that quantization and w2.

The patches are forward hooks plus a wrapper of `apply_rotary_pos_emb` that rounds the RoPE
output of tensors tagged by those hooks (kv_norm outputs, indexer q_b_proj output); see
`OfficialPatch`. Everything else is transformers' own float32 code.

Cross-check: an independent float64 numpy implementation of the whole forward pass written from
MODEL.md + NUMERICS.md (`F64Model`, no transformers code) must agree with the patched model. The
prompt is built token by token (batches of candidate tokens as one-token decode steps) so that in
the official and reference profiles every discrete decision (router top-k, indexer top-k on the FP4
scores, argmax) has a clear relative margin, and in the official profile every rounded value and
every block scale is at least ROUND_BUILD (relative to its block's amax) away from a rounding
boundary; the float64 model re-checks the whole sequence (>= ROUND_FINAL).

The act_quant variant is NOT guarded that way (about 6,000 of its ~1.3M rounded values per prompt
lie within 1e-5 of a boundary, far too many to avoid by choosing tokens), and it is chaotic in
float32: one e4m3 flip of an activation moves downstream router/indexer scores by ~1e-3, so two
float32 evaluations of the same act_quant forward (HF one call, HF token by token, float64) drift
apart by up to several percent on later rows. meta.json records how far.

Also writes tests/fixtures-official/roundings.json: unit-level golden vectors for the e4m3
block-64, e2m1 block-32 round trips and the 32/64/128-point Hadamard transform.

Usage:  python tools/make_official_fixtures.py [--out tests/fixtures-official] [--only NAME ...]
Deterministic: running it twice writes byte-identical files.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_fixtures as mf  # noqa: E402  (sets torch to 1 thread)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

hfm = mf.hfm
CSA, HCA, SWA = mf.CSA, mf.HCA, mf.SWA

KV_BLOCK = 64  # FP8 scales of the window rows / compressed entries (nope channels)
FP4_BLOCK = 32  # FP4 scales of the indexer queries / entries
ACT_BLOCK = 128  # activation quantization before FP8/FP4 GEMMs
E4M3_MAX, FP4_MAX = 448.0, 6.0
E4M3_FLOOR = float(np.float32(1e-4))  # amax floor (fp32 1e-4)
FP4_FLOOR = 6.0 * 2.0**-126

# Rounding margins: distance of a value to the nearest decision boundary of its grid (midpoint
# between two neighbouring grid values, times the block scale), relative to its block's amax; and
# for every block the distance of amax to the nearest scale boundary qmax*2^k, relative to amax.
# A boundary whose two sides differ by less than EXEMPT_STEP*amax (tiny e4m3 values, e.g. the
# subnormal range, where every value lies within 1e-5*amax of a boundary) is not a near-tie that
# matters: a flip there moves one value by < 1e-4 of its block's amax.
ROUND_BUILD = 1.5e-5  # per new row while the prompt is built (float32 HF values)
ROUND_FINAL = 1e-5  # whole sequence, float64 implementation
EXEMPT_STEP = 1e-4

# ------------------------------------------------------------------------------------------------
# Formats, float64 numpy (the implementation behind the float64 model and roundings.json)
# ------------------------------------------------------------------------------------------------

E4M3_GRID = mf.E4M3_POS  # 0 .. 448, index = code
FP4_GRID = mf.FP4_POS  # 0 .. 6, index = code
FORMATS = {
    # name: (grid, qmax, amax floor)
    "e4m3": (E4M3_GRID, E4M3_MAX, E4M3_FLOOR),
    "e2m1": (FP4_GRID, FP4_MAX, FP4_FLOOR),
}


def _midpoints(grid):
    return (grid[:-1] + grid[1:]) / 2, np.diff(grid)


MIDS = {k: _midpoints(v[0]) for k, v in FORMATS.items()}


def quant_blocks(x: np.ndarray, block: int, fmt: str, with_info: bool = False):
    """Round trip of x (float64, any shape) in blocks of `block` along the last axis; a last
    block shorter than `block` (dim not a multiple) is the remainder. Power-of-two scale
    s = 2^ceil(log2(amax/qmax)) (smallest with amax <= qmax*s), amax floored; codes by round to
    nearest, ties to even. Returns deq (and, with_info, a dict of codes, scale exponents and
    margins)."""
    grid, qmax, floor = FORMATS[fmt]
    x = np.asarray(x, dtype=np.float64)
    N = x.shape[-1]
    nb = -(-N // block)
    pad = np.zeros(x.shape[:-1] + (nb * block,))
    pad[..., :N] = x
    xb = pad.reshape(x.shape[:-1] + (nb, block))
    amax = np.maximum(np.abs(xb).max(axis=-1), floor)
    e = mf.block_exponents(amax, qmax)
    s = np.exp2(e.astype(np.float64))[..., None]
    u = xb / s
    a = np.abs(u)
    idx = mf.round_to_grid(a, grid)
    deq = (np.where(np.signbit(u), -1.0, 1.0) * grid[idx] * s).reshape(pad.shape)[..., :N]
    if not with_info:
        return deq
    mids, steps = MIDS[fmt]
    j = np.clip(np.searchsorted(mids, a), 1, len(mids) - 1)
    d0, d1 = np.abs(a - mids[j - 1]), np.abs(a - mids[j])
    d = np.where(d0 <= d1, d0, d1)
    st = np.where(d0 <= d1, steps[j - 1], steps[j])
    rel = d * s / amax[..., None]
    step_rel = st * s / amax[..., None]
    elem = np.where(step_rel >= EXEMPT_STEP, rel, np.inf).reshape(pad.shape)[..., :N]
    exempt = (step_rel < EXEMPT_STEP).reshape(pad.shape)[..., :N]
    r = amax / qmax
    k = np.round(np.log2(r))
    scale_m = np.abs(r / np.exp2(k) - 1.0)
    scale_m = np.where(np.abs(np.abs(xb).max(axis=-1)) > floor, scale_m, np.inf)  # floored blocks
    codes = (idx | np.where(np.signbit(u), 0x80 if fmt == "e4m3" else 0x8, 0)).reshape(pad.shape)[..., :N]
    return deq, {"codes": codes, "exp": e, "elem": elem, "exempt": exempt, "scale": scale_m}


def hadamard_matrix(n: int) -> np.ndarray:
    """Sylvester Hadamard H[i, j] = (-1)^popcount(i & j), unscaled."""
    i = np.arange(n)
    pc = np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :])
    return np.where(pc % 2 == 0, 1.0, -1.0)


def hadamard(x: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    return x @ hadamard_matrix(n) * n**-0.5  # H symmetric


class MarginLog:
    """Smallest rounding margins per site (float64 model), plus counts."""

    def __init__(self):
        self.sites: dict[str, dict] = {}

    def add(self, site: str, info: dict):
        s = self.sites.setdefault(site, {"values": 0, "blocks": 0, "exempt": 0, "min_elem": np.inf,
                                         "min_scale": np.inf, "below": 0})
        s["values"] += int(info["elem"].size)
        s["blocks"] += int(info["scale"].size)
        s["exempt"] += int(info["exempt"].sum())
        s["min_elem"] = min(s["min_elem"], float(info["elem"].min(initial=np.inf)))
        s["min_scale"] = min(s["min_scale"], float(info["scale"].min(initial=np.inf)))
        s["below"] += int((info["elem"] < ROUND_FINAL).sum() + (info["scale"] < ROUND_FINAL).sum())

    def minimum(self, prefix: str = "") -> float:
        v = [min(s["min_elem"], s["min_scale"]) for k, s in self.sites.items() if k.startswith(prefix)]
        return float(min(v)) if v else float("inf")

    def summary(self) -> dict:
        return {k: {"values": s["values"], "blocks": s["blocks"], "exempt_values": s["exempt"],
                    "min_value_margin": float(f"{s['min_elem']:.4g}"),
                    "min_scale_margin": float(f"{s['min_scale']:.4g}"),
                    f"n_below_{ROUND_FINAL:g}": s["below"]}
                for k, s in sorted(self.sites.items())}


# ------------------------------------------------------------------------------------------------
# Formats, torch float32 (used inside the patched transformers model; written independently:
# torch's float8_e4m3fn cast, torch.round, a butterfly Hadamard, fast_round_scale emulation)
# ------------------------------------------------------------------------------------------------


def t_round_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """kernel.py fast_round_scale: t = fl32(amax * fl32(1/qmax)); 2^(E(t) + [M(t) != 0])."""
    t = amax * torch.tensor(1.0 / qmax, dtype=torch.float32)
    m, e = torch.frexp(t)  # t = m * 2^e, m in [0.5, 1)
    e = torch.where(m == 0.5, e - 1, e)
    return torch.ldexp(torch.ones_like(t), e)


def _blocked(x: torch.Tensor, block: int):
    N = x.shape[-1]
    nb = -(-N // block)
    xp = F.pad(x, (0, nb * block - N)) if nb * block != N else x
    return xp.reshape(*x.shape[:-1], nb, block), N


def t_fp8_round_trip(x: torch.Tensor, block: int) -> torch.Tensor:
    xb, N = _blocked(x.float(), block)
    s = t_round_scale(xb.abs().amax(-1, keepdim=True).clamp_min(1e-4), E4M3_MAX)
    q = (xb / s).to(torch.float8_e4m3fn).to(torch.float32) * s
    return q.reshape(*x.shape[:-1], -1)[..., :N]


def t_fp4_round_trip(x: torch.Tensor, block: int) -> torch.Tensor:
    xb, N = _blocked(x.float(), block)
    s = t_round_scale(xb.abs().amax(-1, keepdim=True).clamp_min(FP4_FLOOR), FP4_MAX)
    u = xb / s
    a = u.abs()
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    q = torch.copysign(q.clamp(max=FP4_MAX), u) * s
    return q.reshape(*x.shape[:-1], -1)[..., :N]


def t_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Fast Walsh-Hadamard (Sylvester order) over the last dim, then * n^-1/2 (fp32)."""
    n = x.shape[-1]
    assert n & (n - 1) == 0, n
    lead = x.shape[:-1]
    y, h = x.float(), 1
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        y = torch.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], dim=-2)
        h *= 2
    return y.reshape(*lead, n) * (n**-0.5)


# ------------------------------------------------------------------------------------------------
# The patch on transformers' DeepseekV4ForCausalLM
# ------------------------------------------------------------------------------------------------

_ACTIVE: "OfficialPatch | None" = None
_orig_rope = hfm.apply_rotary_pos_emb


def _rope_with_official_rounding(x, cos, sin, unsqueeze_dim=1):
    out = _orig_rope(x, cos, sin, unsqueeze_dim)
    p = _ACTIVE
    if p is not None and p.tags:
        kind = p.tags.pop(x.untyped_storage().data_ptr(), None)
        if kind is not None:
            out = p.round_after_rope(kind, out)
    return out


hfm.apply_rotary_pos_emb = _rope_with_official_rounding  # module global, looked up at call time


class OfficialPatch:
    """Switchable official numerics on one HF model.

    Forward hooks tag the tensors whose RoPE output must be rounded (by storage pointer):
    `self_attn.kv_norm` output (window row), `compressor.kv_norm` output (main entries),
    `indexer.kv_norm` output (indexer entries), `indexer.q_b_proj` output (indexer queries); the
    wrapped `apply_rotary_pos_emb` rounds its output for tagged inputs. act_quant: forward
    pre-hooks on the listed Linear modules, and a replacement forward of the routed experts.
    While `record` is a list, every rounding appends (kind, m, per-row minimum margin) computed
    from the float32 values (for the prompt construction)."""

    def __init__(self, model, cfg):
        self.official = False
        self.act_quant = False
        self.record: list | None = None
        self.B = 1  # batch size of the current call (for per-candidate margins)
        self.n_tokens = 1
        self.tags: dict[int, tuple] = {}
        self.rd = cfg.qk_rope_head_dim
        for name, mod in model.named_modules():
            if isinstance(mod, hfm.DeepseekV4Attention):
                mod.kv_norm.register_forward_hook(self._tag(("win", 1)))
                for lin in (mod.q_a_proj, mod.q_b_proj, mod.kv_proj, mod.o_b_proj):
                    lin.register_forward_pre_hook(self._aq)
            elif isinstance(mod, (hfm.DeepseekV4HCACompressor, hfm.DeepseekV4CSACompressor)):
                mod.kv_norm.register_forward_hook(self._tag(("entry", mod.compress_rate)))
            elif isinstance(mod, hfm.DeepseekV4Indexer):
                mod.kv_norm.register_forward_hook(self._tag(("ientry", mod.compress_rate)))
                mod.q_b_proj.register_forward_hook(self._tag(("iq", 1)))
                mod.q_b_proj.register_forward_pre_hook(self._aq)
            elif isinstance(mod, hfm.DeepseekV4MLP):
                for lin in (mod.gate_proj, mod.up_proj, mod.down_proj):
                    lin.register_forward_pre_hook(self._aq)
            elif isinstance(mod, hfm.DeepseekV4Experts):
                mod.forward = types.MethodType(_experts_forward_factory(self, mod.forward), mod)
        model.register_forward_pre_hook(lambda m, a, k=None: self.tags.clear())
        model.register_forward_hook(self._check_tags)

    def set(self, official: bool, act_quant: bool = False):
        global _ACTIVE
        assert official or not act_quant
        self.official, self.act_quant = official, act_quant
        _ACTIVE = self

    def _check_tags(self, mod, args, out):
        assert not self.tags, f"unconsumed rounding tags {list(self.tags.values())}"

    def _tag(self, kind):
        def hook(mod, args, out):
            if self.official:
                self.tags[out.untyped_storage().data_ptr()] = kind
        return hook

    def _aq(self, mod, args):
        if self.official and self.act_quant:
            x = args[0]
            if self.record is not None:
                self.record_rows("act", x.reshape(-1, x.shape[-1]), ACT_BLOCK, "e4m3")
            return (t_fp8_round_trip(x, ACT_BLOCK),) + tuple(args[1:])
        return None

    def round_after_rope(self, kind, out):
        name, m = kind
        if name in ("win", "entry"):
            nope = out.shape[-1] - self.rd
            assert nope % KV_BLOCK == 0, "nope channels must be a multiple of 64"
            if self.record is not None:
                self.record_rows(name, out[..., :nope].reshape(-1, nope), KV_BLOCK, "e4m3")
            res = torch.cat([t_fp8_round_trip(out[..., :nope], KV_BLOCK), out[..., nope:]], dim=-1)
        else:
            rot = t_hadamard(out)
            if self.record is not None:
                self.record_rows(name, rot.reshape(-1, rot.shape[-1]), FP4_BLOCK, "e2m1")
            res = t_fp4_round_trip(rot, FP4_BLOCK)
        return res.to(out.dtype)

    def record_rows(self, kind, x2d, block, fmt, token_idx=None):
        """Minimum rounding margin of each row of x2d, reduced to the batch element it belongs to
        (rows are batch-major; token_idx: explicit flat token index per row)."""
        _, info = quant_blocks(x2d.detach().double().numpy(), block, fmt, with_info=True)
        per_row = np.minimum(info["elem"].min(axis=1), info["scale"].min(axis=1))
        n = len(per_row) if token_idx is None else self.n_tokens
        rows = np.arange(len(per_row)) if token_idx is None else token_idx.numpy()
        b = rows // (n // self.B)
        out = np.full(self.B, np.inf)
        np.minimum.at(out, b, per_row)
        self.record.append((kind, out))

    def step_round_margins(self) -> np.ndarray:
        """Per batch element: smallest rounding margin of the call."""
        return np.min([m for _, m in self.record] + [np.full(self.B, np.inf)], axis=0)

    def all_round_margins(self) -> dict:
        out = {}
        for name, mins in self.record:
            out[name] = min(out.get(name, np.inf), float(mins.min(initial=np.inf)))
        return out


def _experts_forward_factory(patch: OfficialPatch, orig):
    """Routed experts, official order with act_quant: h = SwiGLU(w1 x, w3 x) (x FP8-rounded),
    h <- routing_weight * h, FP8 round trip of h, then w2 (kernel: Expert.forward + linear)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if not (patch.official and patch.act_quant):
            return orig(hidden_states, top_k_index, top_k_weights)
        patch.n_tokens = hidden_states.shape[0]
        if patch.record is not None:
            patch.record_rows("act", hidden_states, ACT_BLOCK, "e4m3")
        xq = t_fp8_round_trip(hidden_states, ACT_BLOCK)
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[expert_idx])
            h = self._apply_gate(F.linear(xq[token_idx], self.gate_up_proj[expert_idx]))
            h = h * top_k_weights[token_idx, top_k_pos, None]
            if patch.record is not None:
                patch.record_rows("act", h, ACT_BLOCK, "e4m3", token_idx)
            cur = F.linear(t_fp8_round_trip(h, ACT_BLOCK), self.down_proj[expert_idx])
            final.index_add_(0, token_idx, cur.to(final.dtype))
        return final

    return forward


# ------------------------------------------------------------------------------------------------
# Independent float64 implementation (MODEL.md §1.4, §3; NUMERICS.md §1-§3)
# ------------------------------------------------------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x, axis):
    mx = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - mx)
    return e / e.sum(axis=axis, keepdims=True)


def _rms(x, w=None, eps=1e-6):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * w if w is not None else y


class F64Model:
    def __init__(self, vals: dict[str, np.ndarray], spec: mf.Spec):
        self.p = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in vals.items()}
        self.s = spec
        r = spec.rope_dim
        i = np.arange(r // 2, dtype=np.float64)
        main = spec.rope_theta ** (-2 * i / r)
        base = spec.compress_rope_theta
        f = base ** (-2 * i / r)
        y = spec.yarn

        def corr(beta):
            return r * math.log(y["original_max_position_embeddings"] / (2 * math.pi * beta)) / (2 * math.log(base))

        lo = max(math.floor(corr(y["beta_fast"])), 0)
        hi = min(math.ceil(corr(y["beta_slow"])), r - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((i - lo) / (hi - lo), 0, 1)
        comp = f / y["factor"] * ramp + f * (1 - ramp)
        # angles are computed in float32 (MODEL.md §1.4): fp32 inv_freq, fp32 product
        self.inv = {"main": main.astype(np.float32), "compress": comp.astype(np.float32)}

    def P(self, k):
        return self.p[k]

    # --- pieces -----------------------------------------------------------------------------
    def rope(self, x, pos, table, sign=1.0):
        """Interleaved RoPE on the last rd channels; x [T, ..., d], pos [T]."""
        r = self.s.rope_dim
        ang = (np.asarray(pos, dtype=np.float32)[:, None].astype(np.float64)
               * self.inv[table].astype(np.float64)).astype(np.float32).astype(np.float64)
        shp = (len(pos),) + (1,) * (x.ndim - 2) + (r // 2,)
        c, s = np.cos(ang).reshape(shp), sign * np.sin(ang).reshape(shp)
        d = x.shape[-1]
        x0, x1 = x[..., d - r :: 2], x[..., d - r + 1 :: 2]
        out = x.copy()
        out[..., d - r :: 2] = x0 * c - x1 * s
        out[..., d - r + 1 :: 2] = x1 * c + x0 * s
        return out

    def hc_pre(self, X, pre):
        T = X.shape[0]
        v = _rms(X.reshape(T, -1))
        mu = v @ self.P(pre + "fn").T
        base, sc = self.P(pre + "base"), self.P(pre + "scale")
        eps = 1e-6
        pre_w = _sigmoid(mu[:, :4] * sc[0] + base[:4]) + eps
        post = 2 * _sigmoid(mu[:, 4:8] * sc[1] + base[4:8])
        C = (mu[:, 8:] * sc[2] + base[8:]).reshape(T, 4, 4)
        C = _softmax(C, -1) + eps
        C = C / (C.sum(axis=1, keepdims=True) + eps)
        for _ in range(20 - 1):
            C = C / (C.sum(axis=2, keepdims=True) + eps)
            C = C / (C.sum(axis=1, keepdims=True) + eps)
        x = np.einsum("ti,tid->td", pre_w, X)
        return x, post, C

    @staticmethod
    def hc_post(f, X, post, C):
        return post[:, :, None] * f[:, None, :] + np.einsum("tjk,tjd->tkd", C, X)

    def quant(self, x, block, fmt, site):
        if self.mlog is None:
            return quant_blocks(x, block, fmt)
        y, info = quant_blocks(x, block, fmt, with_info=True)
        self.mlog.add(site, info)
        return y

    def aq(self, x, site):
        return self.quant(x, ACT_BLOCK, "e4m3", "act." + site) if self.act_quant else x

    def fp8_nope(self, kv, site):
        if not self.official:
            return kv
        nope = kv.shape[-1] - self.s.rope_dim
        out = kv.copy()
        out[..., :nope] = self.quant(kv[..., :nope], KV_BLOCK, "e4m3", site)
        return out

    def idx_round(self, v, site):
        if not self.official:
            return v
        return self.quant(hadamard(v), FP4_BLOCK, "e2m1", site)

    def compress(self, x, pre, m, overlap, d, table):
        T = x.shape[0]
        a = x @ self.P(pre + "kv_proj.weight").T
        g = x @ self.P(pre + "gate_proj.weight").T
        nw = T // m
        a = a[: nw * m].reshape(nw, m, -1)
        g = g[: nw * m].reshape(nw, m, -1) + self.P(pre + "position_bias")[None]
        if overlap:
            kv = np.zeros((nw, 2 * m, d))
            gs = np.full((nw, 2 * m, d), -np.inf)
            kv[:, m:], gs[:, m:] = a[..., d:], g[..., d:]
            kv[1:, :m], gs[1:, :m] = a[:-1, :, :d], g[:-1, :, :d]
        else:
            kv, gs = a, g
        c = (_softmax(gs, 1) * kv).sum(axis=1)
        c = _rms(c, self.P(pre + "kv_norm.weight"))
        return self.rope(c, np.arange(nw) * m, table)

    def attention(self, li, x):
        s = self.s
        pre = f"model.layers.{li}.self_attn."
        lt = s.layer_types[li]
        tab = "main" if lt == SWA else "compress"
        T = x.shape[0]
        pos = np.arange(T)
        H, hd = s.heads, s.head_dim
        xa = self.aq(x, f"L{li}.attn_in")
        qr = _rms(xa @ self.P(pre + "q_a_proj.weight").T, self.P(pre + "q_a_norm.weight"))
        qrq = self.aq(qr, f"L{li}.qr")
        q = (qrq @ self.P(pre + "q_b_proj.weight").T).reshape(T, H, hd)
        q = self.rope(_rms(q), pos, tab)
        kv = _rms(xa @ self.P(pre + "kv_proj.weight").T, self.P(pre + "kv_norm.weight"))
        kv = self.fp8_nope(self.rope(kv, pos, tab), f"L{li}.window_kv")
        t_, j_ = np.arange(T)[:, None], np.arange(T)[None, :]
        allow = (j_ <= t_) & (j_ > t_ - s.window)
        keys = kv
        if lt != SWA:
            m = s.rates[lt]
            cp = pre + "compressor."
            C = self.fp8_nope(self.compress(x, cp, m, lt == CSA, hd, tab), f"L{li}.entries")
            N = C.shape[0]
            valid = np.arange(N)[None, :] < ((pos + 1) // m)[:, None]
            if lt == CSA:
                ip = cp + "indexer."
                dI, HI = s.idx_dim, s.idx_heads
                Ei = self.idx_round(self.compress(x, ip, m, True, dI, tab), f"L{li}.indexer_entries")
                qi = (qrq @ self.P(ip + "q_b_proj.weight").T).reshape(T, HI, dI)
                qi = self.idx_round(self.rope(qi, pos, tab), f"L{li}.indexer_q")
                om = (x @ self.P(ip + "scorer.weights_proj.weight").T) * HI**-0.5
                sc = np.maximum(np.einsum("thd,wd->thw", qi, Ei), 0) * dI**-0.5
                sc = np.einsum("thw,th->tw", sc, om)
                K = min(s.idx_topk, N)
                sel = np.zeros((T, N), dtype=bool)
                for t in range(T):
                    nv = int(valid[t].sum())
                    order = np.argsort(-sc[t, :nv], kind="stable")[: min(K, nv)]
                    sel[t, order] = True
                self.decisions[("indexer", li)] = sel
                valid = valid & sel
            keys = np.concatenate([kv, C], axis=0)
            allow = np.concatenate([allow, valid], axis=1)
        lg = np.einsum("thd,jd->thj", q, keys) * hd**-0.5
        lg = np.where(allow[:, None, :], lg, -np.inf)
        sink = self.P(pre + "sinks")[None, :, None]
        mx = np.maximum(lg.max(axis=-1, keepdims=True), sink)
        e = np.exp(lg - mx)
        a = e / (e.sum(axis=-1, keepdims=True) + np.exp(sink - mx))
        o = self.rope(np.einsum("thj,jd->thd", a, keys), pos, tab, sign=-1.0)
        G, R = s.o_groups, s.o_rank
        Wa = self.P(pre + "o_a_proj.weight").reshape(G, R, -1)
        z = np.einsum("tgi,gri->tgr", o.reshape(T, G, -1), Wa).reshape(T, G * R)
        return self.aq(z, f"L{li}.wo_b_in") @ self.P(pre + "o_b_proj.weight").T

    def moe(self, li, x, ids):
        s = self.s
        pre = f"model.layers.{li}.mlp."
        T = x.shape[0]
        lg = x @ self.P(pre + "gate.weight").T
        sp = np.where(lg > 20, lg, np.log1p(np.exp(np.minimum(lg, 20))))
        sc = np.sqrt(sp)
        if li < s.n_hash:
            idx = self.p[pre + "gate.tid2eid"][ids]
        else:
            v = sc + self.P(pre + "gate.e_score_correction_bias")
            idx = np.argsort(-v, axis=1, kind="stable")[:, : s.topk]
            self.decisions[("router", li)] = idx
        w = np.take_along_axis(sc, idx, 1)
        w = w / (w.sum(axis=1, keepdims=True) + 1e-20) * s.routed_scale
        L = s.swiglu_limit
        xq = self.aq(x, f"L{li}.ffn_in")

        def swiglu(g, u):
            g = np.minimum(g, L)
            return g * _sigmoid(g) * np.clip(u, -L, L)

        gu, dn = self.P(pre + "experts.gate_up_proj"), self.P(pre + "experts.down_proj")
        I = s.inter
        y = np.zeros_like(x)
        for e in range(s.experts):
            tok, slot = np.nonzero(idx == e)
            if len(tok) == 0:
                continue
            h = swiglu(xq[tok] @ gu[e, :I].T, xq[tok] @ gu[e, I:].T)
            if self.act_quant:  # weight before w2; the quantized activation is weight*h
                out = self.aq(h * w[tok, slot, None], f"L{li}.routed_w2_in") @ dn[e].T
            else:
                out = (h @ dn[e].T) * w[tok, slot, None]
            np.add.at(y, tok, out)
        sp_ = pre + "shared_experts."
        h = swiglu(xq @ self.P(sp_ + "gate_proj.weight").T, xq @ self.P(sp_ + "up_proj.weight").T)
        return y + self.aq(h, f"L{li}.shared_w2_in") @ self.P(sp_ + "down_proj.weight").T

    def forward(self, ids: np.ndarray, official: bool, act_quant: bool = False,
                mlog: MarginLog | None = None) -> np.ndarray:
        self.official, self.act_quant, self.mlog = official, act_quant, mlog
        self.decisions = {}
        T = len(ids)
        E = self.P("model.embed_tokens.weight")[ids]
        X = np.repeat(E[:, None, :], 4, axis=1)
        for li in range(len(self.s.layer_types)):
            lp = f"model.layers.{li}."
            x, post, C = self.hc_pre(X, lp + "attn_hc.")
            X = self.hc_post(self.attention(li, _rms(x, self.P(lp + "input_layernorm.weight"))), X, post, C)
            x, post, C = self.hc_pre(X, lp + "ffn_hc.")
            X = self.hc_post(self.moe(li, _rms(x, self.P(lp + "post_attention_layernorm.weight")), ids), X, post, C)
        v = _rms(X.reshape(T, -1))
        mu = v @ self.P("model.hc_head.hc_fn").T
        pre = _sigmoid(mu * self.P("model.hc_head.hc_scale") + self.P("model.hc_head.hc_base")) + 1e-6
        y = np.einsum("ti,tid->td", pre, X)
        return _rms(y, self.P("model.norm.weight")) @ self.P("lm_head.weight").T


# ------------------------------------------------------------------------------------------------
# Fixture specs
# ------------------------------------------------------------------------------------------------

SPECS = [
    # official layout (FP8 128x128 with partial edge blocks: hidden 192; FP4 experts); nope 128 =
    # 2 FP8 blocks, index_head_dim 128 (Hadamard 128, 4 FP4 blocks, rotary channels 64..127);
    # act-quant dims 192 (128 + 64), q_lora 96, G*R 160 (128 + 32), moe inter 96: partial blocks.
    mf.Spec(
        name="official-fp8", style="official", seed=4101, T=200, vocab=512, hidden=192,
        layer_types=[SWA, CSA, HCA, CSA], rates={CSA: 4, HCA: 16}, n_hash=2,
        heads=4, head_dim=192, rope_dim=64, q_lora=96, o_groups=2, o_rank=80,
        experts=8, topk=2, inter=96, idx_heads=8, idx_dim=128, idx_topk=6, window=16,
        rope_theta=10000.0, compress_rope_theta=160000.0,
        yarn={"factor": 16, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1},
        swiglu_limit=1.5, routed_scale=1.5, n_shards=2,
        chunk_pattern=[7, 1, 13, 1, 1, 37, 5, 61, 2, 40, 11],
    ),
    # transformers layout (BF16 + F32); nope 64 = 1 FP8 block, index_head_dim 64 (Hadamard 64,
    # 2 FP4 blocks, rotary 32..63), hidden 96 (one partial act block), G*R 160, moe inter 160.
    mf.Spec(
        name="hf-bf16", style="hf", seed=5202, T=200, vocab=384, hidden=96,
        layer_types=[SWA, CSA, HCA, CSA, HCA], rates={CSA: 4, HCA: 8}, n_hash=1,
        heads=8, head_dim=96, rope_dim=32, q_lora=64, o_groups=4, o_rank=40,
        experts=8, topk=3, inter=160, idx_heads=8, idx_dim=64, idx_topk=5, window=12,
        rope_theta=20000.0, compress_rope_theta=80000.0,
        yarn={"factor": 8, "original_max_position_embeddings": 512, "beta_fast": 16, "beta_slow": 1},
        swiglu_limit=1.25, routed_scale=2.5,
        chunk_pattern=[7, 1, 13, 1, 1, 29, 3, 18, 40, 2, 33, 52],
    ),
]


# ------------------------------------------------------------------------------------------------
# Model setup, prompt construction
# ------------------------------------------------------------------------------------------------


class Env:
    """Weights written to `d`, the HF model (+ probe + patch) and the float64 model."""

    def __init__(self, spec: mf.Spec, d: str):
        self.spec = spec
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            if f.endswith((".safetensors", ".json")):
                os.remove(os.path.join(d, f))
        self.cfg_json, self.hf_cfg = mf.build_configs(spec)
        shapes_model = mf.DeepseekV4ForCausalLM._from_config(self.hf_cfg, dtype=torch.float32)
        shapes = {k: tuple(v.shape) for k, v in shapes_model.state_dict().items()}
        del shapes_model
        hf_vals, stored = mf.make_weights(spec, shapes)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(self.cfg_json, f, indent=2, sort_keys=(spec.style == "hf"))
            f.write("\n")
        files = mf.write_checkpoint(spec, d, stored)
        back = mf.dequant_stored(spec, files, shapes)  # independent read-back of the bytes
        mf.check_with_safetensors_lib(files)
        for k in shapes:
            assert np.array_equal(back[k], hf_vals[k]), f"read-back mismatch for {k}"
        self.model = mf.load_model(self.hf_cfg, hf_vals)
        self.probe = BatchProbe(self.model, self.hf_cfg)
        self.patch = OfficialPatch(self.model, self.hf_cfg)
        self.f64 = F64Model(back, spec)  # float64 model on the weights read back from the files
        rot = self.model.model.rotary_emb
        for tab in ("main", "compress"):
            hf_inv = getattr(rot, f"{tab}_inv_freq").numpy()
            ulps = np.abs(hf_inv.view(np.int32) - self.f64.inv[tab].view(np.int32))
            assert ulps.max() <= 1, (tab, hf_inv, self.f64.inv[tab])
            self.inv_freq_ulps = getattr(self, "inv_freq_ulps", {}) | {tab: int(ulps.max())}
        r = spec.rope_dim
        ratio = rot.compress_inv_freq.double().numpy() / spec.compress_rope_theta ** (-np.arange(0, r, 2) / r)
        f = spec.yarn["factor"]
        assert np.any((ratio < 1 - 1e-6) & (ratio > 1 / f + 1e-6)), f"YaRN blend inactive: {ratio}"

    def hf(self, ids, profile: str, keep_last=False, record=False):
        """One-call forward; profile: reference | official | act_quant. Resets the probe."""
        self.patch.set(profile != "reference", profile == "act_quant")
        self.patch.record = [] if record else None
        self.patch.B = 1
        self.probe.reset()
        return mf.forward_full(self.model, ids, keep_last=keep_last)

    def hf_chunked(self, ids, chunks, profile="official"):
        self.patch.set(profile != "reference", profile == "act_quant")
        self.patch.record = None
        self.probe.count_clamp = False
        try:
            return mf.forward_chunked(self.model, self.hf_cfg, ids, chunks)
        finally:
            self.probe.count_clamp = True

    @torch.no_grad()
    def step(self, cands: np.ndarray, cache, profile: str, record: bool):
        """One decode step of len(cands) candidate tokens (batch) on `cache` (already expanded to
        that batch). Returns (logits [B, V], decision margin [B], rounding margin [B])."""
        self.patch.set(profile != "reference", profile == "act_quant")
        self.patch.record = [] if record else None
        self.patch.B = len(cands)
        self.probe.reset()
        out = self.model(input_ids=torch.from_numpy(cands[:, None].astype(np.int64)),
                         past_key_values=cache, use_cache=True)
        lg = out.logits[:, -1].double().numpy()
        dec = [mf.argmax_margins(lg)]
        dec += list(self.probe.router_margins().values())
        dec += list(self.probe.indexer_margins_batch())
        rnd = self.patch.step_round_margins() if record else np.full(len(cands), np.inf)
        self.patch.B = 1
        return lg, np.min(dec, axis=0), rnd


class BatchProbe(mf.Probe):
    """make_fixtures' Probe, plus indexer records of every batch element (one-token steps of a
    batch of candidates) and a switch for the SwiGLU clamp statistics (slow)."""

    def __init__(self, model, cfg):
        self.count_clamp = True
        super().__init__(model, cfg)

    def _scorer(self, layer):
        def hook(mod, args, out):
            self._pending[layer]["scores"] = out[0].detach().double().numpy()
            self._pending[layer]["scores_b"] = out.detach().double().numpy()
        return hook

    def _indexer_post(self, layer, mod):
        inner = super()._indexer_post(layer, mod)

        def hook(m, args, out):
            self._pending[layer]["sel_b"] = out.numpy()
            inner(m, args, out)
        return hook

    def _shared(self):
        inner = super()._shared()
        return lambda mod, args: inner(mod, args) if self.count_clamp else None

    def _routed(self, mod):
        inner = super()._routed(mod)
        return lambda m, args: inner(m, args) if self.count_clamp else None

    def indexer_margins_batch(self):
        """Per indexer call of a one-token step: relative top-k margin per batch element."""
        for rec in self.indexer:
            sc, sel, m, K = rec["scores_b"][:, 0], rec["sel_b"][:, 0], rec["m"], rec["k"]
            p = int(rec["pos"][-1])
            nvalid = min((p + 1) // m, sc.shape[1])
            rel = np.full(len(sc), np.inf)
            if nvalid > K:
                for b in range(len(sc)):
                    s = sc[b, :nvalid]
                    srt = -np.sort(-s)
                    scale = np.abs(s).max()
                    rel[b] = (srt[K - 1] - srt[K]) / scale if scale > 0 else 0.0
                    if rel[b] > 0:
                        mine = set(np.argsort(-s, kind="stable")[:K].tolist())
                        assert mine == set(int(x) for x in sel[b] if x >= 0), "indexer selection mismatch"
            yield rel


PROFILES = ("official", "act_quant", "reference")


def build_prompt(env: Env, T: int, checks: list, n_cand: int, stream: int = 0, log_every: int = 50):
    """Token ids chosen position by position. Each step tries a batch of n_cand random candidate
    tokens as one-token decode steps on the committed caches of the checked profiles and takes
    the first candidate for which, in every profile of `checks` ((profile, rounding threshold or
    None)), every discrete decision of the step (router top-k, indexer top-k, argmax) clears
    BUILD_MARGIN and every rounding of the step (the token's window rows, indexer queries and
    activations, the entries it completes) clears the profile's rounding threshold."""
    spec = env.spec
    rng = np.random.default_rng([spec.seed, 77, stream])
    caches = {p: DynamicCache(config=env.hf_cfg) for p, _ in checks}
    ids: list[int] = []
    stats = {"candidates": 0, **{f"fail_round_{p}": 0 for p, tau in checks if tau},
             **{f"fail_decision_{p}": 0 for p, _ in checks}}
    env.probe.count_clamp = False
    while len(ids) < T:
        t = len(ids)
        for attempt in range(50):
            cands = rng.integers(0, spec.vocab, n_cand)
            ok = np.ones(n_cand, dtype=bool)
            new = {}
            for prof, tau in checks:
                c = copy.deepcopy(caches[prof])
                if t > 0:
                    c.reorder_cache(torch.zeros(n_cand, dtype=torch.long))
                _, dec, rnd = env.step(cands, c, prof, record=bool(tau))
                if tau:
                    bad = ok & (rnd < tau)
                    stats[f"fail_round_{prof}"] += int(bad.sum())
                    ok &= ~bad
                bad = ok & (dec < mf.BUILD_MARGIN)
                stats[f"fail_decision_{prof}"] += int(bad.sum())
                ok &= ~bad
                new[prof] = c
                if not ok.any():
                    break
            if ok.any():
                i = int(np.argmax(ok))
                stats["candidates"] += i + 1
                for prof, _ in checks:
                    new[prof].reorder_cache(torch.tensor([i]))
                caches = new
                ids.append(int(cands[i]))
                break
            stats["candidates"] += n_cand
        else:
            raise RuntimeError(f"no acceptable token at position {t}")
        if log_every and t % log_every == 0:
            print(f"    [{spec.name}] prompt position {t}/{T} {stats}", flush=True)
    env.probe.count_clamp = True
    return np.array(ids, dtype=np.int64), stats


# ------------------------------------------------------------------------------------------------
# One fixture
# ------------------------------------------------------------------------------------------------


def row_rel_err(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per row: max |a - ref| / max |ref| (the measure of crates/dsv4-core/tests/fixtures.rs)."""
    return np.abs(a - ref).max(axis=-1) / np.abs(ref).max(axis=-1)


def compare_decisions(probe: mf.Probe, dec: dict) -> list[str]:
    """HF's router / indexer selections (one-call forward) vs the float64 model's."""
    bad = []
    for layer, _, _, idx in probe.router:
        mine = dec[("router", layer)]
        if not np.array_equal(np.sort(mine, 1), np.sort(idx, 1)):
            bad.append(f"router.L{layer}")
    for rec in probe.indexer:
        sel, mine = rec["sel"], dec[("indexer", rec["layer"])]
        for t in range(len(sel)):
            if set(int(x) for x in sel[t] if x >= 0) != set(np.nonzero(mine[t])[0].tolist()):
                bad.append(f"indexer.L{rec['layer']}.row{t}")
                break
    return bad


BUILD_CHECKS = [("official", ROUND_BUILD), ("reference", None)]


def make_fixture(spec: mf.Spec, out_root: str) -> dict:
    t0 = time.time()
    d = os.path.join(out_root, spec.name)
    env = Env(spec, d)
    rep: dict = {"name": spec.name}

    ids, stats = build_prompt(env, spec.T, BUILD_CHECKS, n_cand=32)
    rep["build"] = stats
    t1 = time.time()

    logits, margins, xcheck, lf64, mlogs = {}, {}, {}, {}, {}
    for prof in PROFILES:
        lg = env.hf(ids, prof, record=(prof == "official"))
        logits[prof] = lg
        margins[prof] = mf.full_check(env.probe, lg)
        if prof == "official":
            rep["clamp"] = dict(env.probe.clamp)
            rep["hf_round_margins"] = {k: float(f"{v:.4g}") for k, v in env.patch.all_round_margins().items()}
        mlog = MarginLog()
        lf = env.f64.forward(ids, prof != "reference", prof == "act_quant", mlog)
        lf64[prof] = lf
        bad = compare_decisions(env.probe, env.f64.decisions)
        e = row_rel_err(lg, lf)
        xcheck[prof] = {"max_row_rel": float(f"{e.max():.3g}"), "median_row_rel": float(f"{np.median(e):.3g}"),
                        "max_abs": float(f"{np.abs(lg - lf).max():.3g}"),
                        "max_abs_logit": float(f"{np.abs(lf).max():.3g}"),
                        "decisions": "identical router and indexer selections" if not bad else f"differ: {bad[:6]}"}
        if prof != "act_quant":  # guarded profiles
            assert min(margins[prof].values()) >= mf.FINAL_MARGIN, (prof, margins[prof])
            assert not bad, (prof, bad)
            assert xcheck[prof]["max_row_rel"] < 1e-5, (prof, xcheck[prof])
        if prof != "reference":
            mlogs[prof] = mlog
    for k in ("routed_gate", "routed_up", "shared_gate", "shared_up"):
        assert rep["clamp"][k] > 0, f"SwiGLU clamp never fired: {k}"
    off_min = mlogs["official"].minimum()
    assert off_min >= ROUND_FINAL, f"official rounding margin {off_min} < {ROUND_FINAL}"
    t2 = time.time()

    chunks = mf.chunks_for(spec, spec.T)
    decode_chunks = [spec.decode_prefill] + [1] * (spec.T - spec.decode_prefill)
    lg_chunk = env.hf_chunked(ids, chunks)
    lg_dec = env.hf_chunked(ids, decode_chunks)
    rep["chunked_vs_onecall_row_rel"] = float(f"{row_rel_err(lg_chunk, logits['official']).max():.3g}")
    rep["decode_vs_onecall_row_rel"] = float(f"{row_rel_err(lg_dec, logits['official']).max():.3g}")
    assert rep["chunked_vs_onecall_row_rel"] < 1e-5 and rep["decode_vs_onecall_row_rel"] < 1e-5, rep

    # act_quant: how far two float32 evaluations drift apart (not guarded, see README)
    aq_dec = env.hf_chunked(ids, [1] * spec.T, "act_quant")
    pair = {"hf_onecall_vs_f64": row_rel_err(logits["act_quant"], lf64["act_quant"]),
            "hf_onecall_vs_hf_token_by_token": row_rel_err(logits["act_quant"], aq_dec),
            "hf_token_by_token_vs_f64": row_rel_err(aq_dec, lf64["act_quant"])}
    worst = np.max(list(pair.values()), axis=0)
    stable = int(np.argmax(worst > 1e-5)) if np.any(worst > 1e-5) else spec.T
    aq_summary = {"rows_agreeing_below_1e-5_from_start": stable}
    for k, e in pair.items():
        aq_summary[k] = {"max_row_rel": float(f"{e.max():.3g}"), "median_row_rel": float(f"{np.median(e):.3g}"),
                         "rows_above_1e-4": int((e > 1e-4).sum())}
    aq_summary["decision_margins_onecall"] = {k: float(f"{v:.3g}") for k, v in margins["act_quant"].items()}
    ml = mlogs["act_quant"].summary()
    aq_summary["f64_rounding_values_within_1e-5_of_a_boundary"] = {
        "act_quant_sites": sum(v[f"n_below_{ROUND_FINAL:g}"] for k, v in ml.items() if k.startswith("act.")),
        "kv_and_indexer_sites": sum(v[f"n_below_{ROUND_FINAL:g}"] for k, v in ml.items() if not k.startswith("act.")),
        "values_rounded": sum(v["values"] for v in ml.values())}
    rep["act_quant"] = aq_summary
    t3 = time.time()

    lo = logits["official"]
    f32 = lambda a: mf.st_tensor("F32", a.astype(np.float32))  # noqa: E731
    i64 = lambda a: mf.st_tensor("I64", np.asarray(a, dtype=np.int64))  # noqa: E731
    ref = {
        "ids": i64(ids),
        "logits": f32(lo),
        "argmax": i64(lo.argmax(axis=1)),
        "maxval": f32(lo.max(axis=1)),
        "chunks": i64(chunks),
        "logits_chunked": f32(lg_chunk),
        "decode_prefill": i64([spec.decode_prefill]),
        "logits_decode": f32(lg_dec),
        "logits_act_quant": f32(logits["act_quant"]),
        "argmax_act_quant": i64(logits["act_quant"].argmax(axis=1)),
        "logits_reference_profile": f32(logits["reference"]),
        "argmax_reference_profile": i64(logits["reference"].argmax(axis=1)),
    }
    mf.write_safetensors(os.path.join(d, "reference.safetensors"), ref, {
        "format": "pt", "generator": "tools/make_official_fixtures.py", "numerics": "official",
        "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]})

    def fmt_m(m):
        return {k: float(f"{v:.4g}") for k, v in m.items()}

    nope = spec.head_dim - spec.rope_dim
    meta = {
        "fixture": spec.name, "layout": spec.style, "seed": spec.seed,
        "transformers": transformers.__version__, "dtype": "float32", "numerics": "official",
        "profile": {
            "window_kv": f"after kv_norm + RoPE: FP8 e4m3 round trip of channels [0,{nope}) in blocks of "
                         f"{KV_BLOCK} (power-of-two scale, amax floor 1e-4); rotary channels "
                         f"[{nope},{spec.head_dim}) not rounded; before the window cache update",
            "compressed_entries": "after pooling + kv_norm + RoPE at w*m: the same FP8 round trip of the "
                                  "nope channels (CSA and HCA), before the entry cache update",
            "indexer_entries": f"after pooling + kv_norm + RoPE: Hadamard over {spec.idx_dim} channels "
                               f"(Sylvester, * n^-1/2), FP4 e2m1 round trip in blocks of {FP4_BLOCK} "
                               "(power-of-two scale, amax floor 6*2^-126); cached rotated",
            "indexer_queries": "q_b_proj(q_residual) -> RoPE -> Hadamard -> FP4 round trip; scores use the "
                               "rotated rounded q and entries (ReLU, weights_proj, sum over heads in fp32)",
            "act_quant (logits_act_quant only)": f"FP8 e4m3 round trip in blocks of {ACT_BLOCK} along the "
                         "input dim (partial last block = the remainder) of the inputs of q_a_proj/wq_a, "
                         "kv_proj/wkv, q_b_proj/wq_b, o_b_proj/wo_b, indexer q_b_proj/wq_b, shared "
                         "gate/up/down (w1/w3/w2), routed w1/w3 and w2; routed: w2 input = "
                         "routing_weight * SwiGLU output (weight applied before w2)",
            "everything else": "transformers 5.23 float32 (no bf16 rounding, NUMERICS §4 not simulated)",
        },
        "layer_types": spec.layer_types, "compress_rates": spec.rates,
        "T": spec.T, "chunks": chunks, "decode_prefill": spec.decode_prefill,
        "prompt_build": stats,
        "min_relative_margins": {p: fmt_m(m) for p, m in margins.items() if p != "act_quant"},
        "rounding_margin_rule": f"distance to the nearest rounding boundary / block amax, and |amax - qmax*2^k| / "
                                f"amax for the scale; boundaries whose step is < {EXEMPT_STEP:g}*amax exempt; "
                                f"built >= {ROUND_BUILD:g} (float32 HF, per new row), asserted >= {ROUND_FINAL:g} "
                                "(float64, official profile, whole sequence)",
        "rounding_margins_official_f64": mlogs["official"].summary(),
        "rounding_margins_official_hf_f32": rep["hf_round_margins"],
        "act_quant_stability (not guarded)": rep["act_quant"],
        "f64_cross_check_row_rel": xcheck,
        "chunked_vs_onecall_row_rel": rep["chunked_vs_onecall_row_rel"],
        "decode_vs_onecall_row_rel": rep["decode_vs_onecall_row_rel"],
        "swiglu_clamp_counts_official": rep["clamp"],
    }
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    rep["xcheck"] = xcheck
    rep["margins"] = margins
    rep["f64_round_min_official"] = off_min
    rep["timing_s"] = {"setup+build": round(t1 - t0, 1), "onecall+f64": round(t2 - t1, 1),
                       "chunked+decode": round(t3 - t2, 1), "total": round(time.time() - t0, 1)}
    rep["files"] = {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))}
    return rep


# ------------------------------------------------------------------------------------------------
# Unit-level golden vectors (roundings.json)
# ------------------------------------------------------------------------------------------------


def _f32_exact(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    assert np.array_equal(x.astype(np.float32).astype(np.float64), x), "input not exact in float32"
    return x


def _e4m3_mid(i: int) -> float:
    return float((E4M3_GRID[i] + E4M3_GRID[i + 1]) / 2)


def golden_cases_e4m3() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(777)
    cases = []
    # (1) an all-zero block (amax floor 1e-4 -> scale 2^-22) next to an ordinary block
    cases.append(("zero_block_then_random", np.concatenate([np.zeros(64), rng.standard_normal(64) * 3])))
    # (2) exact midpoints between neighbouring e4m3 values (ties -> even mantissa); block amax is
    #     exactly 448*s (s = 2^-3), so x/s hits the midpoints exactly; both signs; incl. the
    #     subnormal range (midpoints of m*2^-9) and the top binade (432 = tie of 416 / 448)
    s = 2.0**-3
    idx = np.unique(np.concatenate([np.arange(0, 12), np.arange(12, 125, 3), [123, 124, 125]]))
    mids = np.array([_e4m3_mid(i) for i in idx])[:63]
    sign = np.where(np.arange(len(mids)) % 2 == 0, 1.0, -1.0)
    blk = np.concatenate([[448.0], sign * mids])
    cases.append(("ties_to_even_scale_2^-3", blk * s))
    # (3) largest values: amax = 448*s exactly keeps s; amax one float32 ulp above 448*s doubles s
    top = np.array([448, 440, 436, 432, 428, 424, 416, 400, 384, 352, -448, -432, -420, 300, 1, 0.5])
    a = np.concatenate([top, rng.uniform(-448, 448, 48)])
    b = a.copy()
    b[0] = float(np.nextafter(np.float32(448.0), np.float32(1e9)))
    cases.append(("largest_values_amax_448_then_448+ulp", np.concatenate([a, b])))
    # (4) subnormal range of e4m3 (|x/s| < 2^-6; grid m*2^-9): scale 1 (amax 448), values around
    #     2^-10 .. 2^-6 incl. the ties 2^-10 (-> 0), 3*2^-10 (-> 2^-8), 5*2^-10 (-> 2^-8),
    #     and values just off the ties
    sub = np.array([2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10, 7 * 2.0**-10, 15 * 2.0**-10, 2.0**-11, 2.0**-12,
                    2.0**-6, 2.0**-7, 1.5 * 2.0**-9, 2.0**-9, 2.0**-10 * 1.001, 2.0**-10 * 0.999, 3e-4, 1e-3, 1.5e-2])
    sub = np.concatenate([sub, -sub])
    blk = np.concatenate([[448.0], sub, rng.uniform(-2.0**-6, 2.0**-6, 64 - 1 - len(sub))])
    cases.append(("subnormal_range_scale_1", blk))
    # (5) tiny amax (< 1e-4): the floor sets the scale to 2^-22 (without it 2^-29)
    cases.append(("tiny_amax_floor", rng.standard_normal(64) * 1e-6))
    # (6) random blocks of very different magnitudes (each block its own power-of-two scale)
    cases.append(("random_mixed_magnitudes", np.concatenate([rng.standard_normal(64) * 1e3,
                                                             rng.standard_normal(64) * 1e-2])))
    return [(n, _f32_exact(np.asarray(x, dtype=np.float32).astype(np.float64))) for n, x in cases]


def golden_cases_fp4() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(778)
    cases = [("zero_block", np.zeros(32))]
    # ties at scale 2^-1 (amax = 6*s exactly): x/s = 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2,
    # 3.5->4, 5->4 (ties to even mantissa), both signs, and values just off the ties
    s = 0.5
    u = np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5,
                  0.26, 0.74, 1.26, 2.49, 2.51, 3.49, 4.99, 5.01, 5.9, 0.1, 0, 1, 1.5, 2, 3, 4, -6])
    cases.append(("ties_to_even_scale_2^-1", u * s))
    # amax exactly 6*2^k keeps 2^k; one float32 ulp above doubles the scale
    a = rng.uniform(-6, 6, 32)
    a[0] = 6.0
    b = a.copy()
    b[0] = float(np.nextafter(np.float32(6.0), np.float32(1e9)))
    cases.append(("scale_boundary_amax_6_then_6+ulp", np.concatenate([a, b]) * 4.0))
    cases.append(("random_two_blocks", np.concatenate([rng.standard_normal(32), rng.standard_normal(32) * 1e-3])))
    return [(n, _f32_exact(np.asarray(x, dtype=np.float32).astype(np.float64))) for n, x in cases]


def _torch_check_e4m3(x: np.ndarray, block: int, deq: np.ndarray, codes: np.ndarray, exps: np.ndarray):
    """Cross-check against torch: float8_e4m3fn cast codes and the kernel's fast_round_scale."""
    t = torch.from_numpy(x.astype(np.float32))
    xb, N = _blocked(t, block)
    sc = t_round_scale(xb.abs().amax(-1, keepdim=True).clamp_min(1e-4), E4M3_MAX)
    assert np.array_equal(np.log2(sc.numpy()[..., 0]).astype(np.int64), exps), "scale differs from fast_round_scale"
    tc = (xb / sc).to(torch.float8_e4m3fn).view(torch.uint8).reshape(-1)[:N].numpy()
    assert np.array_equal(tc, codes.astype(np.uint8)), "e4m3 codes differ from torch's float8_e4m3fn cast"
    assert np.array_equal(t_fp8_round_trip(t, block).double().numpy(), deq), "torch round trip differs"
    assert np.array_equal(mf.decode_e4m3(codes) * np.repeat(np.exp2(exps.astype(float)), block)[:N], deq)


def _torch_check_fp4(x: np.ndarray, block: int, deq: np.ndarray, exps: np.ndarray):
    t = torch.from_numpy(x.astype(np.float32))
    xb, N = _blocked(t, block)
    sc = t_round_scale(xb.abs().amax(-1, keepdim=True).clamp_min(FP4_FLOOR), FP4_MAX)
    assert np.array_equal(np.log2(sc.numpy()[..., 0].astype(np.float64)).astype(np.int64), exps)
    assert np.array_equal(t_fp4_round_trip(t, block).double().numpy(), deq), "torch fp4 round trip differs"


def fast_round_scale_sweep() -> dict:
    """fast_round_scale (fp32 t = amax * fl32(1/qmax)) vs the exact smallest power of two, for fp32
    amax within +-4096 ulps of every boundary qmax*2^k, k = -100..100."""
    out = {}
    for qmax in (E4M3_MAX, FP4_MAX):
        amax = []
        for k in range(-100, 101):
            b = np.float32(qmax * 2.0**k)
            bits = b.view(np.int32) + np.arange(-4096, 4097, dtype=np.int32)
            amax.append(bits.view(np.float32))
        amax = np.concatenate(amax)
        fast = np.log2(t_round_scale(torch.from_numpy(amax), qmax).double().numpy()).astype(np.int64)
        exact = mf.block_exponents(amax.astype(np.float64), qmax)
        out[f"qmax_{qmax:g}"] = {"amax_tested": int(amax.size), "disagreements": int((fast != exact).sum())}
        assert np.array_equal(fast, exact), out
    return out


def make_goldens(path: str) -> dict:
    doc: dict = {
        "generator": "tools/make_official_fixtures.py",
        "notes": [
            "Inputs and quantized outputs are exactly representable in float32 (JSON numbers round-trip); hadamard.y is float64.",
            "scale_e8m0 is the biased e8m0 byte (scale = 2^(byte-127)); scale = smallest power of two with "
            "amax <= qmax*scale (amax floored first) = kernel.py fast_round_scale (checked on a sweep).",
            "A last block shorter than the block size (dim not a multiple) is the remainder and gets its own scale.",
            "codes: e4m3fn byte (sign bit 0x80) as torch's float8_e4m3fn cast gives it / e2m1 nibble (sign bit 0x8); "
            "a negative input that rounds to zero keeps its sign bit (-0). Compare y with ==, which ignores the "
            "sign of zero.",
        ],
    }
    e4 = []
    for name, x in golden_cases_e4m3():
        y, info = quant_blocks(x, KV_BLOCK, "e4m3", with_info=True)
        _torch_check_e4m3(x, KV_BLOCK, y, info["codes"], info["exp"])
        e4.append({"name": name, "x": x.tolist(), "scale_e8m0": (info["exp"] + 127).tolist(),
                   "codes": info["codes"].astype(int).tolist(), "y": y.tolist()})
    doc["e4m3_block64"] = {"block": KV_BLOCK, "qmax": E4M3_MAX, "amax_floor": "1e-4 (float32)", "cases": e4}
    # act_quant partial blocks: 192 = 128 + 64, 160 = 128 + 32, 96 = one block of 96
    rng = np.random.default_rng(779)
    aq = []
    for n in (192, 160, 96):
        x = rng.standard_normal(n) * np.where(np.arange(n) < 128, 1.0, 50.0)
        x = _f32_exact(x.astype(np.float32).astype(np.float64))
        y, info = quant_blocks(x, ACT_BLOCK, "e4m3", with_info=True)
        _torch_check_e4m3(x, ACT_BLOCK, y, info["codes"], info["exp"])
        aq.append({"name": f"dim_{n}", "x": x.tolist(), "scale_e8m0": (info["exp"] + 127).tolist(),
                   "codes": info["codes"].astype(int).tolist(), "y": y.tolist()})
    doc["e4m3_block128_act_quant_partial"] = {"block": ACT_BLOCK, "qmax": E4M3_MAX, "amax_floor": "1e-4 (float32)",
                                              "cases": aq}
    f4 = []
    for name, x in golden_cases_fp4():
        y, info = quant_blocks(x, FP4_BLOCK, "e2m1", with_info=True)
        _torch_check_fp4(x, FP4_BLOCK, y, info["exp"])
        f4.append({"name": name, "x": x.tolist(), "scale_e8m0": (info["exp"] + 127).tolist(),
                   "codes": info["codes"].astype(int).tolist(), "y": y.tolist()})
    doc["e2m1_block32"] = {"block": FP4_BLOCK, "qmax": FP4_MAX, "amax_floor": "6*2^-126", "cases": f4}
    hd = []
    rng = np.random.default_rng(780)
    for n in (32, 64, 128):
        H = hadamard_matrix(n)
        assert np.allclose(H @ H.T, n * np.eye(n)) and np.array_equal(H, H.T)
        vecs = [("e0", np.eye(n)[0]), ("e5", np.eye(n)[5]), ("hadamard_row_3", H[3].copy()),
                ("random", rng.standard_normal(n).astype(np.float32).astype(np.float64))]
        for name, x in vecs:
            y = hadamard(x)
            yt = t_hadamard(torch.from_numpy(x.astype(np.float32))).double().numpy()
            assert np.abs(yt - y).max() <= 1e-6 * max(1.0, np.abs(y).max()), "butterfly differs"
            hd.append({"n": n, "name": name, "x": x.tolist(), "y": y.tolist()})
    doc["hadamard"] = {"definition": "y = x @ H_n * n^-1/2, H[i,j] = (-1)^popcount(i&j) (Sylvester); y in float64 "
                                     "(a float32 butterfly agrees within 1e-6)", "cases": hd}
    # indexer QAT row: Hadamard(128) then FP4 block 32; inputs redrawn until every value is >= 1e-3
    # (relative to its block amax) from a rounding boundary, so a float32 Hadamard gives the same
    qat = []
    for i in range(3):
        while True:
            x = rng.standard_normal(128).astype(np.float32).astype(np.float64) * (1.0, 0.05, 30.0)[i]
            y, info = quant_blocks(hadamard(x), FP4_BLOCK, "e2m1", with_info=True)
            if min(info["elem"].min(), info["scale"].min()) >= 1e-3:
                break
        yt = t_fp4_round_trip(t_hadamard(torch.from_numpy(x.astype(np.float32))), FP4_BLOCK).double().numpy()
        assert np.array_equal(yt, y)
        qat.append({"n": 128, "x": x.tolist(), "scale_e8m0": (info["exp"] + 127).tolist(),
                    "codes": info["codes"].astype(int).tolist(), "y": y.tolist()})
    doc["indexer_qat_hadamard128_fp4"] = {"definition": "fp4 block-32 round trip of hadamard(x)", "cases": qat}
    doc["fast_round_scale_check"] = fast_round_scale_sweep()
    text = json.dumps(doc, indent=1)
    # one line per number list
    text = re.sub(r"\[\s+([-0-9.e+,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    assert json.loads(text) == json.loads(json.dumps(doc))
    with open(path, "w") as f:
        f.write(text + "\n")
    return {"file": path, "bytes": os.path.getsize(path)}


# ------------------------------------------------------------------------------------------------


def _run_one(args):
    spec, out = args
    torch.set_num_threads(1)
    return make_fixture(spec, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tests", "fixtures-official"))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--jobs", type=int, default=2, help="fixtures built in parallel processes")
    args = ap.parse_args()
    assert transformers.__version__ == "5.23.0", transformers.__version__
    mf.self_test_codecs()
    t0 = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    print(json.dumps(make_goldens(os.path.join(out, "roundings.json"))), flush=True)
    specs = [s for s in SPECS if not args.only or s.name in args.only]
    if args.jobs > 1 and len(specs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(args.jobs, len(specs))) as pool:
            reps = pool.map(_run_one, [(s, out) for s in specs])
    else:
        reps = [_run_one((s, out)) for s in specs]
    for rep in reps:
        print(json.dumps(rep, indent=1, default=str), flush=True)
    print(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
