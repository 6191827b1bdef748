#!/usr/bin/env python3
"""Stress dsv4 against transformers on variant random checkpoints built with make_fixtures.py's
own functions (different seeds, shapes and config choices).

For each variant: write /tmp/hidden/<name>/ (config.json + weights), run HF (float32, eager) one-call
(+ one chunked pattern through HF's cache), run `dsv4 logits` one-call and with several chunkings,
compare per row (max abs diff / max abs ref <= 1e-4, same argmax). Reference decision margins are
recorded per row (router / indexer / argmax) so that a mismatch next to a near-tie can be discounted.

Usage: python tools/hidden_check.py [--only NAME ...] [--bin target/release/dsv4] [--out /tmp/hidden]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402
from make_fixtures import CSA, HCA, SWA, Spec  # noqa: E402
from transformers import DeepseekV4Config  # noqa: E402

TOL = 1e-4
MAX_REPAIR = 400
NO_REPAIR = False

DEFAULTS = dict(
    vocab=512, hidden=128, layer_types=[SWA, CSA, HCA], rates={CSA: 4, HCA: 16}, n_hash=1,
    heads=4, head_dim=64, rope_dim=16, q_lora=64, o_groups=2, o_rank=32,
    experts=8, topk=2, inter=64, idx_heads=4, idx_dim=32, idx_topk=4, window=16,
    rope_theta=10000.0, compress_rope_theta=160000.0,
    yarn={"factor": 16, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1},
    swiglu_limit=1.5, routed_scale=1.5,
)


def V(name, style, seed, T, extra=None, **over):
    kw = dict(DEFAULTS)
    kw.update(over)
    spec = Spec(name=name, style=style, seed=seed, T=T, **kw)
    return spec, dict(extra or {})


# extra keys: no_yarn (bool), max_pos (int), mlp_layer_types (list, hf only)
VARIANTS = [
    V("off-pro-h128", "official", 11, 300, layer_types=[HCA, HCA, CSA, HCA], rates={CSA: 4, HCA: 128},
      n_hash=0, n_shards=2, idx_topk=8),
    V("off-h256-hd128", "official", 12, 180, hidden=256, head_dim=128, rope_dim=32, heads=2, o_groups=2,
      o_rank=64, q_lora=128, layer_types=[CSA, SWA, HCA], rates={CSA: 4, HCA: 16}, n_hash=2, idx_dim=64,
      idx_heads=2, idx_topk=3, inter=96, window=32, n_shards=3),
    V("hf-h64-allhash-k1", "hf", 13, 100, hidden=64, head_dim=32, rope_dim=8, heads=4, o_groups=1, o_rank=16,
      q_lora=32, layer_types=[CSA, CSA, SWA], n_hash=3, topk=1, experts=4, inter=32, window=4,
      idx_dim=16, idx_heads=2, idx_topk=2),
    V("hf-h160-k4-bigtopk", "hf", 14, 200, hidden=160, layer_types=[SWA, HCA, CSA, SWA],
      rates={CSA: 4, HCA: 32}, n_hash=1, topk=4, experts=6, inter=80, idx_topk=64, window=64,
      swiglu_limit=3.0),
    V("off-noyarn-h128", "official", 15, 64, layer_types=[CSA, HCA], rates={CSA: 4, HCA: 8}, n_hash=1,
      extra={"no_yarn": True}),
    V("hf-noyarn-h96", "hf", 16, 90, hidden=96, head_dim=32, rope_dim=8, heads=8, o_groups=4, o_rank=16,
      layer_types=[HCA, CSA, SWA], rates={CSA: 4, HCA: 8}, extra={"no_yarn": True}),
    V("off-T1", "official", 17, 1, layer_types=[SWA, CSA, HCA], rates={CSA: 4, HCA: 128}),
    V("hf-T3-lt-window", "hf", 18, 3, layer_types=[CSA, HCA, SWA], rates={CSA: 4, HCA: 8}, window=8),
    V("hf-T7-ratio-edge", "hf", 19, 7, layer_types=[CSA, HCA], rates={CSA: 4, HCA: 8}, window=5),
    V("off-i32-deep", "official", 20, 260, layer_types=[SWA, CSA, CSA, HCA, SWA, HCA, CSA],
      rates={CSA: 4, HCA: 128}, n_hash=3, tid2eid_dtype="I32", topk=3, experts=16, idx_topk=16),
    V("hf-i32-h256", "hf", 21, 150, hidden=256, head_dim=64, rope_dim=16, heads=8, o_groups=8, o_rank=8,
      q_lora=160, layer_types=[HCA, SWA, CSA], rates={CSA: 4, HCA: 16}, tid2eid_dtype="I32", n_hash=0,
      idx_topk=1, swiglu_limit=0.75),
    V("off-maxpos-lt-T", "official", 22, 130, layer_types=[SWA, CSA, HCA], rates={CSA: 4, HCA: 32},
      yarn={"factor": 4, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}),
    V("hf-maxpos-mismatch", "hf", 23, 120, layer_types=[CSA, HCA], rates={CSA: 4, HCA: 16},
      extra={"max_pos": 100000}),
    V("off-T400-h128", "official", 24, 400, layer_types=[SWA, CSA, HCA, CSA, SWA], rates={CSA: 4, HCA: 128},
      n_hash=2, idx_topk=8, window=24, heads=8, o_groups=4, o_rank=16),
    V("hf-T400-w64", "hf", 25, 400, hidden=64, head_dim=64, rope_dim=16, heads=2, o_groups=2, o_rank=32,
      q_lora=48, layer_types=[CSA, HCA, CSA], rates={CSA: 4, HCA: 128}, window=64, idx_topk=32,
      idx_dim=64, idx_heads=8),
    V("off-sw-limit10", "official", 26, 80, layer_types=[HCA, CSA, SWA], rates={CSA: 4, HCA: 16},
      swiglu_limit=10.0, routed_scale=1.0, rope_theta=50000.0, compress_rope_theta=40000.0,
      yarn={"factor": 40, "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1}),
    V("hf-allsliding", "hf", 27, 60, layer_types=[SWA, SWA], rates={CSA: 4, HCA: 128}, n_hash=1, window=7),
    V("hf-rope-full", "hf", 28, 70, head_dim=32, rope_dim=32, layer_types=[SWA, CSA, HCA], rates={CSA: 4, HCA: 8}),
    V("off-hd32-vocab3k", "official", 29, 120, hidden=96 + 32, vocab=3000, head_dim=32, rope_dim=8, heads=8,
      o_groups=8, o_rank=16, layer_types=[CSA, HCA, HCA, CSA], rates={CSA: 4, HCA: 16}, n_hash=2,
      idx_dim=16, idx_heads=16, idx_topk=6, window=12),
]

VARIANTS2 = [
    V("off-hca128-T256", "official", 41, 256, layer_types=[HCA, CSA, HCA], rates={CSA: 4, HCA: 128}, window=8,
      idx_topk=12),
    V("hf-hca128-T257", "hf", 42, 257, layer_types=[CSA, HCA], rates={CSA: 4, HCA: 128}, window=16),
    V("hf-hca128-T255", "hf", 43, 255, layer_types=[HCA, SWA], rates={CSA: 4, HCA: 128}, window=32),
    V("hf-heads1", "hf", 44, 80, heads=1, o_groups=1, o_rank=32, layer_types=[SWA, CSA, HCA]),
    V("off-ogroups-eq-heads", "official", 45, 90, heads=8, o_groups=8, o_rank=16, head_dim=32, rope_dim=8,
      layer_types=[CSA, SWA, HCA], rates={CSA: 4, HCA: 8}),
    V("off-idx1head-idxdim-eq-rope", "official", 46, 120, idx_heads=1, idx_dim=16, rope_dim=16, idx_topk=3,
      layer_types=[CSA, CSA], rates={CSA: 4, HCA: 128}),
    V("hf-k-eq-experts", "hf", 47, 70, experts=4, topk=4, n_hash=2, layer_types=[SWA, CSA, HCA]),
    V("off-nhash-gt-layers", "official", 48, 70, n_hash=5, layer_types=[CSA, HCA, SWA], rates={CSA: 4, HCA: 16}),
    V("off-h64-qlora48", "official", 49, 100, hidden=64, q_lora=48, inter=32, head_dim=64, rope_dim=16,
      heads=2, o_groups=1, o_rank=48, layer_types=[HCA, CSA], rates={CSA: 4, HCA: 32}),
    V("off-h384-hd128", "official", 50, 140, hidden=384, head_dim=128, rope_dim=32, heads=4, o_groups=2,
      o_rank=96, q_lora=192, inter=160, idx_dim=128, idx_heads=2, layer_types=[SWA, CSA, HCA],
      rates={CSA: 4, HCA: 16}, n_shards=4),
    V("hf-rope4", "hf", 51, 90, head_dim=32, rope_dim=4, layer_types=[CSA, SWA, HCA], rates={CSA: 4, HCA: 8}),
    V("hf-yarn-frac", "hf", 52, 150, layer_types=[CSA, HCA], rates={CSA: 4, HCA: 16},
      yarn={"factor": 2.5, "original_max_position_embeddings": 64, "beta_fast": 8, "beta_slow": 2}),
    V("hf-window2", "hf", 53, 60, window=2, layer_types=[SWA, CSA, HCA], rates={CSA: 4, HCA: 8}),
    V("hf-window-gt-T", "hf", 54, 30, window=64, layer_types=[CSA, HCA, SWA], rates={CSA: 4, HCA: 8}),
    V("off-topk-eq-entries", "official", 55, 64, idx_topk=16, layer_types=[CSA, HCA], rates={CSA: 4, HCA: 16}),
    V("hf-8layers-allcsa", "hf", 56, 120, n_hash=0, layer_types=[CSA] * 8, idx_topk=5, hidden=64, inter=32,
      q_lora=32, heads=2, o_groups=2, o_rank=16),
    V("off-theta-small", "official", 57, 300, rope_theta=100.0, compress_rope_theta=100.0,
      layer_types=[SWA, CSA, HCA], rates={CSA: 4, HCA: 8}, window=40,
      yarn={"factor": 4, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1}),
    V("off-i32-4shards", "official", 58, 110, tid2eid_dtype="I32", n_shards=4, n_hash=2, topk=3,
      layer_types=[HCA, CSA, SWA], rates={CSA: 4, HCA: 32}),
    V("off-h224-v1001", "official", 62, 200, hidden=224, vocab=1001, q_lora=200, inter=96, o_rank=40,
      heads=6, o_groups=3, head_dim=64, rope_dim=16, layer_types=[CSA, HCA, SWA, CSA], rates={CSA: 4, HCA: 64},
      idx_topk=7, window=20, n_hash=1),
    V("hf-hd16", "hf", 59, 80, head_dim=16, rope_dim=8, heads=16, o_groups=4, o_rank=16, idx_dim=16,
      layer_types=[CSA, HCA, SWA], rates={CSA: 4, HCA: 8}),
]

# CSA compress rate other than 4 / HCA rate 4 (transformers supports it through compress_rates)
EDGE_VARIANTS = [
    V("hf-csa8", "hf", 31, 100, layer_types=[SWA, CSA, HCA], rates={CSA: 8, HCA: 16}),
    V("hf-hca4", "hf", 32, 100, layer_types=[SWA, CSA, HCA], rates={CSA: 4, HCA: 4}),
    V("off-csa8", "official", 33, 100, layer_types=[SWA, CSA, HCA], rates={CSA: 8, HCA: 16}),
    V("hf-swiglu0", "hf", 34, 40, layer_types=[SWA, CSA], swiglu_limit=0.0),
    V("hf-window1", "hf", 36, 40, window=1, layer_types=[SWA, CSA, HCA], rates={CSA: 4, HCA: 8}),
    V("hf-hca2", "hf", 37, 40, layer_types=[SWA, CSA, HCA], rates={CSA: 4, HCA: 2}),
    V("off-hc2-iters3", "official", 38, 60, layer_types=[SWA, CSA, HCA], rates={CSA: 4, HCA: 8},
      extra={"cfg_over": {"hc_mult": 2, "hc_sinkhorn_iters": 3}}),
    V("hf-eps", "hf", 39, 60, layer_types=[SWA, CSA, HCA], rates={CSA: 4, HCA: 8},
      extra={"cfg_over": {"rms_norm_eps": 1e-2, "hc_eps": 1e-2}}),
    V("hf-shared2", "hf", 40, 40, layer_types=[SWA, CSA], extra={"cfg_over": {"n_shared_experts": 2}}),
    V("hf-shared0", "hf", 60, 40, layer_types=[SWA, CSA], extra={"cfg_over": {"n_shared_experts": 0}}),
    V("hf-nonorm-topk", "hf", 61, 40, layer_types=[SWA, CSA], extra={"cfg_over": {"norm_topk_prob": False}}),
    V("hf-mlp-nonprefix", "hf", 35, 60, layer_types=[SWA, CSA, HCA],
      extra={"mlp_layer_types": ["moe", "hash_moe", "moe"]}),
]


def random_variant(i: int, rseed: int):
    """A random plausible spec (shapes the real generator could use)."""
    r = np.random.default_rng([rseed, i])
    ch = lambda xs: xs[int(r.integers(len(xs)))]  # noqa: E731
    style = ch(["official", "hf"])
    hidden = ch([64, 128, 160, 256] + ([96] if style == "hf" else []))
    head_dim, rope_dim = ch([(32, 8), (64, 16), (128, 32)])
    heads = ch([1, 2, 4, 8])
    o_groups = ch([g for g in (1, 2, 4, 8) if heads % g == 0])
    n = int(r.integers(1, 7))
    lt = [ch([SWA, CSA, HCA]) for _ in range(n)]
    hca = ch([8, 16, 32, 128])
    experts = ch([4, 8, 16])
    topk = int(r.integers(1, min(4, experts - 1) + 1))
    idx_dim = ch([d for d in (16, 32, 64, 128) if d >= rope_dim])
    yarn_f = ch([4, 16, 40])
    orig = ch([256, 512, 4096])
    T = int(ch([1, 2, 5, 17, 64, 130, 257, 300, 400]))
    spec, extra = V(f"rand{rseed}-{i}", style, 1000 * rseed + i, T, hidden=hidden, head_dim=head_dim,
                    rope_dim=rope_dim, heads=heads, o_groups=o_groups, o_rank=ch([16, 32, 48]),
                    q_lora=ch([32, 64, 96, 128]), layer_types=lt, rates={CSA: 4, HCA: hca},
                    n_hash=int(r.integers(0, n + 1)), experts=experts, topk=topk, inter=ch([32, 64, 96]),
                    idx_heads=ch([2, 4, 8]), idx_dim=idx_dim, idx_topk=ch([1, 2, 4, 8, 16, 64, 512]),
                    window=ch([4, 8, 12, 16, 32, 64]), vocab=ch([300, 1000, 2000]),
                    tid2eid_dtype=ch(["I32", "I64"]), swiglu_limit=ch([0.75, 1.5, 3.0]),
                    routed_scale=ch([1.0, 1.5, 2.5]), n_shards=ch([1, 2, 3]) if style == "official" else 1,
                    yarn={"factor": yarn_f, "original_max_position_embeddings": orig, "beta_fast": 32,
                          "beta_slow": 1},
                    extra={"no_yarn": bool(r.random() < 0.25)})
    return spec, extra


def max_pos_of(spec: Spec, extra: dict) -> int:
    if "max_pos" in extra:
        return extra["max_pos"]
    if extra.get("no_yarn"):
        return 4096
    return mf.max_pos(spec)


def build_configs(spec: Spec, extra: dict):
    """Like make_fixtures.build_configs, with no-YaRN / max_pos / mlp_layer_types options."""
    no_yarn = extra.get("no_yarn", False)
    mp = max_pos_of(spec, extra)
    kwargs = mf.hf_config_kwargs(spec) if not no_yarn else None
    if no_yarn:
        s2 = copy.copy(spec)
        s2.yarn = {"factor": 1, "original_max_position_embeddings": 1}
        kwargs = mf.hf_config_kwargs(s2)
        kwargs["rope_parameters"] = None
    kwargs["max_position_embeddings"] = mp
    kwargs.update(extra.get("cfg_over", {}))
    if "mlp_layer_types" in extra:
        kwargs["mlp_layer_types"] = list(extra["mlp_layer_types"])
    if spec.style == "official":
        s2 = copy.copy(spec)
        if no_yarn:
            s2.yarn = {"factor": 1, "original_max_position_embeddings": 1}
        cfg_json = mf.official_config(s2)
        cfg_json["max_position_embeddings"] = mp
        if no_yarn:
            del cfg_json["rope_scaling"]
        cfg_json.update(extra.get("cfg_over", {}))
        if all(r in (0, 4, 128) for r in cfg_json["compress_ratios"]) and spec.rates[CSA] == 4 \
                and spec.rates[HCA] == 128:
            hf_cfg = DeepseekV4Config.from_dict(copy.deepcopy(cfg_json))
        else:
            hf_cfg = DeepseekV4Config(**kwargs)
        if hasattr(hf_cfg, "quantization_config"):
            delattr(hf_cfg, "quantization_config")
    else:
        hf_cfg = DeepseekV4Config(**kwargs)
        hf_cfg.architectures = ["DeepseekV4ForCausalLM"]
        hf_cfg.dtype = torch.bfloat16
        with tempfile.TemporaryDirectory() as tmp:
            hf_cfg.save_pretrained(tmp)
            with open(os.path.join(tmp, "config.json")) as f:
                cfg_json = json.load(f)
    assert hf_cfg.layer_types == spec.layer_types, hf_cfg.layer_types
    return cfg_json, hf_cfg


def row_margins(probe: mf.Probe, logits: np.ndarray) -> np.ndarray:
    T = logits.shape[0]
    m = mf.argmax_margins(logits).copy()
    try:
        if probe.cfg.num_experts_per_tok < probe.cfg.n_routed_experts:  # k == E: no router decision
            for v in probe.router_margins().values():
                m = np.minimum(m, v[:T])
    except AssertionError as e:
        print("   router margin assert:", e)
    try:
        for v in probe.indexer_margins().values():
            m = np.minimum(m, v[:T])
    except AssertionError as e:
        print("   indexer margin assert:", e)
    return m


def chunkings(T: int, rng) -> dict:
    out = {}
    if T > 1:
        out["ones"] = [1] * T
        pat = [3, 1, 17, 5, 29, 2, 64, 11, 1, 90, 7, 130]
        c, s = [], 0
        for p in pat:
            if s + p >= T:
                break
            c.append(p)
            s += p
        c.append(T - s)
        out["odd"] = c
        out["pre_dec"] = [max(T - 5, 1)] + [1] * (T - max(T - 5, 1))
        if T > 8:
            cuts = np.sort(rng.choice(np.arange(1, T), size=min(4, T - 1), replace=False))
            out["rand"] = np.diff(np.concatenate([[0], cuts, [T]])).tolist()
    return out


def compare(got: np.ndarray, ref: np.ndarray, margins: np.ndarray) -> dict:
    if got.shape != ref.shape:
        return {"ok": False, "error": f"shape {got.shape} vs {ref.shape}"}
    rel = np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)
    am = got.argmax(axis=1) == ref.argmax(axis=1)
    bad = np.nonzero((rel > TOL) | ~am)[0]
    r = {"ok": len(bad) == 0, "max_rel": float(rel.max()), "n_bad_rows": int(len(bad))}
    if len(bad):
        b = int(bad[0])
        r.update(first_bad_row=b, rel_at_first=float(rel[b]), argmax_same_at_first=bool(am[b]),
                 min_margin_upto_first=float(margins[: b + 1].min()), margin_at_first=float(margins[b]),
                 argmax_mismatch_rows=int((~am).sum()))
    return r


def run_dsv4(binary, d, ids, chunks, out):
    cmd = [binary, "logits", "--model", d, "--ids", ",".join(map(str, ids.tolist())), "--out", out]
    if chunks is not None:
        cmd += ["--chunks", ",".join(map(str, chunks))]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return None, (p.stderr.strip() or p.stdout.strip())[-2000:]
    return np.load(out), None


def run_variant(spec: Spec, extra: dict, root: str, binary: str) -> dict:
    t0 = time.time()
    d = os.path.join(root, spec.name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    res = {"name": spec.name, "style": spec.style, "seed": spec.seed, "T": spec.T,
           "layers": [mf.ratio_of(spec, lt) if lt != SWA else 0 for lt in spec.layer_types],
           "layer_types": [lt.split("_")[0][:4] for lt in spec.layer_types], "extra": extra}
    try:
        cfg_json, hf_cfg = build_configs(spec, extra)
    except Exception as e:  # noqa: BLE001
        res["status"] = f"HF config rejected: {type(e).__name__}: {e}"
        return res
    m0 = mf.DeepseekV4ForCausalLM._from_config(hf_cfg, dtype=torch.float32)
    shapes = {k: tuple(v.shape) for k, v in m0.state_dict().items()}
    del m0
    hf_vals, stored = mf.make_weights(spec, shapes)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg_json, f, indent=2, sort_keys=(spec.style == "hf"))
    mf.write_checkpoint(spec, d, stored)
    model = mf.load_model(hf_cfg, hf_vals)
    probe = mf.Probe(model, hf_cfg)
    rng = np.random.default_rng([spec.seed, 4242])
    ids = rng.integers(0, spec.vocab, spec.T).astype(np.int64)
    # margin repair: resample the first row whose decisions (router / indexer / argmax) have a
    # relative margin < BUILD_MARGIN; rows before it do not depend on the change (causal)
    res["resampled"] = 0
    for it in range(MAX_REPAIR + 1):
        probe.reset()
        ref = mf.forward_full(model, ids)
        margins = row_margins(probe, ref)
        bad = np.nonzero(margins < mf.BUILD_MARGIN)[0]
        if not len(bad) or it == MAX_REPAIR or NO_REPAIR:
            break
        ids[bad[0]] = rng.integers(0, spec.vocab)
        res["resampled"] += 1
    res["ref_min_margin"] = float(margins.min())
    res["clamp_fired"] = {k: v for k, v in probe.clamp.items() if not k.endswith("_n")}
    chs = chunkings(spec.T, rng)
    if "odd" in chs:
        hfc = mf.forward_chunked(model, hf_cfg, ids, chs["odd"])
        res["hf_chunked_vs_onecall"] = float(np.abs(hfc - ref).max() / np.abs(ref).max())
    t1 = time.time()
    runs = {"onecall": None, **chs}
    res["dsv4"] = {}
    w, T = spec.window, spec.T
    if 1 < w < T:
        runs["win"] = [w] * (T // w) + ([T % w] if T % w else [])
    for nm, ch in runs.items():
        got, err = run_dsv4(binary, d, ids, ch, os.path.join(d, f"out_{nm}.npy"))
        if err is not None:
            res["dsv4"][nm] = {"ok": False, "error": err}
            continue
        res["dsv4"][nm] = compare(got, ref, margins)
        if nm != "onecall" and not res["dsv4"][nm]["ok"]:
            res["dsv4"][nm]["chunks_head"] = ch[:20]
    res["ok"] = all(v["ok"] for v in res["dsv4"].values())
    low = np.nonzero(margins < mf.BUILD_MARGIN)[0]
    if len(low):  # repair gave up: which rows are trustworthy (before the first near-tie row)
        res["first_low_margin_row"] = int(low[0])
    res["time_s"] = {"hf": round(t1 - t0, 1), "dsv4": round(time.time() - t1, 1)}
    np.save(os.path.join(d, "ref_logits.npy"), ref.astype(np.float32))
    np.save(os.path.join(d, "ids.npy"), ids)
    np.save(os.path.join(d, "ref_margins.npy"), margins)
    return res


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/hidden")
    ap.add_argument("--bin", default=os.path.join(here, "..", "target", "release", "dsv4"))
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--edge", action="store_true", help="also run EDGE_VARIANTS")
    ap.add_argument("--random", type=int, default=0, help="run N random variants instead")
    ap.add_argument("--rseed", type=int, default=7)
    ap.add_argument("--no-repair", action="store_true", help="plain random prompts (near-ties possible)")
    args = ap.parse_args()
    global NO_REPAIR
    NO_REPAIR = args.no_repair
    allv = VARIANTS + VARIANTS2 + (EDGE_VARIANTS if args.edge or args.only else [])
    if args.random:
        allv = [random_variant(i, args.rseed) for i in range(args.random)]
    results = []
    for spec, extra in allv:
        if args.only and spec.name not in args.only:
            continue
        print(f"== {spec.name}", flush=True)
        try:
            r = run_variant(spec, extra, args.out, os.path.abspath(args.bin))
        except Exception:  # noqa: BLE001
            r = {"name": spec.name, "status": "harness error", "tb": traceback.format_exc()[-1500:]}
        print(json.dumps(r), flush=True)
        results.append(r)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\nSUMMARY")
    for r in results:
        st = "PASS" if r.get("ok") else "FAIL"
        print(f"{st:5s} {r['name']}: " + json.dumps({k: (v.get('max_rel'), v.get('first_bad_row'),
                                                         v.get('error', '')[:120])
                                                     for k, v in r.get('dsv4', {}).items()})
              + (" " + r.get("status", "") if "status" in r else ""))


if __name__ == "__main__":
    sys.exit(main())
