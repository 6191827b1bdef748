#!/usr/bin/env python3
"""Generate reference fixtures for dsv4 from transformers' DeepseekV4ForCausalLM.

Each fixture is a tiny, fully random DeepSeek-V4 checkpoint (in the official FP8/FP4 layout or in
the transformers BF16 layout) plus `reference.safetensors` holding float32 logits recorded with
transformers 5.23 in float32 on CPU: one-call prefill, chunked prefill through HF's cache,
token-by-token decode and a greedy continuation.

Every discrete decision the model takes on the recorded inputs (router top-k, indexer top-k,
argmax) is kept clear of near-ties: prompts are built token by token, and a candidate token is
accepted only if every decision at its position has a relative margin above a threshold.

Usage:  python tools/make_fixtures.py [--out tests/fixtures] [--only NAME ...]
Deterministic: running it twice writes byte-identical files.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

torch.set_num_threads(1)  # fixed reduction order -> reproducible float results

import transformers  # noqa: E402
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hfm  # noqa: E402

# Margins: a candidate token is accepted when every decision at its row has a relative margin
# >= BUILD_MARGIN; the final full-sequence check asserts >= FINAL_MARGIN (slack for the tiny
# float differences between a prefix forward and the full forward).
BUILD_MARGIN = 2e-3
FINAL_MARGIN = 1e-3

CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
SWA = "sliding_attention"

# ------------------------------------------------------------------------------------------------
# Number formats (numpy only; the decoders below are written independently of the encoders)
# ------------------------------------------------------------------------------------------------


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (no NaNs expected)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return b.astype(np.uint16)


def bf16_decode(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _e4m3_table() -> np.ndarray:
    """Values of the positive e4m3fn codes 0x00..0x7E (ascending)."""
    vals = []
    for code in range(0x7F):
        e, m = code >> 3, code & 7
        vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(vals, dtype=np.float64)


E4M3_POS = _e4m3_table()
E4M3_MAX = 448.0
FP4_POS = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP4_MAX = 6.0


def round_to_grid(a: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Index of the nearest grid value for a >= 0 (grid ascending, indices = codes); ties to the
    even code (= even mantissa, round-to-nearest-even)."""
    hi = np.clip(np.searchsorted(grid, a, side="left"), 0, len(grid) - 1)
    lo = np.clip(hi - 1, 0, len(grid) - 1)
    dlo, dhi = a - grid[lo], grid[hi] - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    return np.where(pick_hi, hi, lo)


def block_exponents(amax: np.ndarray, qmax: float) -> np.ndarray:
    """Smallest power-of-two exponent e with amax / 2^e <= qmax (ue8m0 scale); 0 for empty blocks."""
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(amax / qmax))
    e = np.where(amax > 0, e, 0.0)
    # guard against log2 rounding at exact powers of two
    e = np.where(amax / np.exp2(e) > qmax, e + 1, e)
    e = np.where((amax > 0) & (amax / np.exp2(e - 1) <= qmax), e - 1, e)
    assert np.all(e >= -127) and np.all(e <= 127)
    return e.astype(np.int64)


def quant_fp8_block(w: np.ndarray, block: int = 128):
    """[out, in] float -> (e4m3 bytes [out,in] uint8, e8m0 bytes [ceil(out/128), ceil(in/128)] uint8,
    dequantized float32). Partial edge blocks are allowed."""
    o, i = w.shape
    bo, bi = -(-o // block), -(-i // block)
    pad = np.zeros((bo * block, bi * block))
    pad[:o, :i] = np.abs(w)
    amax = pad.reshape(bo, block, bi, block).max(axis=(1, 3))
    e = block_exponents(amax, E4M3_MAX)
    scale_full = np.exp2(np.repeat(np.repeat(e, block, 0), block, 1)[:o, :i].astype(np.float64))
    q = w / scale_full
    codes = round_to_grid(np.abs(q), E4M3_POS).astype(np.uint8)
    codes |= np.where(q < 0, 0x80, 0).astype(np.uint8)
    deq = (np.sign(q) * E4M3_POS[codes & 0x7F] * scale_full).astype(np.float32)
    return codes, (e + 127).astype(np.uint8), deq


def quant_fp4_row32(w: np.ndarray):
    """[out, in] float -> (packed int8 [out, in/2], e8m0 bytes [out, in/32], dequantized float32).
    Byte j of a row holds element 2j in the low nibble and 2j+1 in the high nibble."""
    o, i = w.shape
    assert i % 32 == 0
    amax = np.abs(w).reshape(o, i // 32, 32).max(axis=2)
    e = block_exponents(amax, FP4_MAX)
    scale_full = np.exp2(np.repeat(e, 32, 1).astype(np.float64))
    q = w / scale_full
    codes = round_to_grid(np.abs(q), FP4_POS).astype(np.uint8)
    codes |= np.where(q < 0, 0x8, 0).astype(np.uint8)
    deq = (np.sign(q) * FP4_POS[codes & 0x7] * scale_full).astype(np.float32)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
    return packed, (e + 127).astype(np.uint8), deq


def decode_e4m3(b: np.ndarray) -> np.ndarray:
    b = b.astype(np.int64)
    s = np.where(b >> 7, -1.0, 1.0)
    e, m = (b >> 3) & 15, b & 7
    assert not np.any((e == 15) & (m == 7)), "NaN code in e4m3 data"
    v = np.where(e == 0, m / 8.0 * 2.0**-6, (1 + m / 8.0) * np.exp2(e - 7.0))
    return s * v


def decode_e8m0(b: np.ndarray) -> np.ndarray:
    assert not np.any(b == 255), "NaN code in e8m0 data"
    return np.exp2(b.astype(np.float64) - 127.0)


FP4_LUT = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def dequant_fp8_bytes(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    o, i = w.shape
    sc = decode_e8m0(s)
    rows = np.arange(o) // 128
    cols = np.arange(i) // 128
    return (decode_e4m3(w) * sc[rows][:, cols]).astype(np.float32)


def dequant_fp4_bytes(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    u = w.view(np.uint8)
    o = u.shape[0]
    vals = np.stack([FP4_LUT[u & 0xF], FP4_LUT[u >> 4]], axis=-1).reshape(o, -1)
    return (vals * np.repeat(decode_e8m0(s), 32, axis=1)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# safetensors (hand-written so dtype strings such as F8_E4M3 / F8_E8M0 are exact)
# ------------------------------------------------------------------------------------------------

ST_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E8M0": 1}


@dataclass
class Stored:
    dtype: str  # safetensors dtype string
    shape: tuple
    data: bytes


def st_tensor(dtype: str, arr: np.ndarray) -> Stored:
    np_type = {"F32": "<f4", "I64": "<i8", "I32": "<i4", "BF16": "<u2", "I8": "i1", "U8": "u1",
               "F8_E4M3": "u1", "F8_E8M0": "u1"}[dtype]
    a = np.ascontiguousarray(arr).astype(np_type, copy=False)
    return Stored(dtype, tuple(int(d) for d in a.shape), a.tobytes())


def write_safetensors(path: str, tensors: dict[str, Stored], metadata: dict | None = None) -> None:
    # Larger element types first (then by name) so every tensor is aligned to its element size.
    names = sorted(tensors, key=lambda n: (-ST_ITEMSIZE[tensors[n].dtype], n))
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for n in names:
        t = tensors[n]
        assert len(t.data) == ST_ITEMSIZE[t.dtype] * int(np.prod(t.shape, dtype=np.int64))
        header[n] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + len(t.data)]}
        off += len(t.data)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for n in names:
            f.write(tensors[n].data)


def read_safetensors(path: str) -> dict[str, tuple[str, tuple, np.ndarray]]:
    """Independent reader: name -> (dtype string, shape, raw numpy array)."""
    with open(path, "rb") as f:
        buf = f.read()
    (hl,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8 : 8 + hl])
    base = 8 + hl
    out = {}
    end_max = 0
    for n, h in header.items():
        if n == "__metadata__":
            continue
        a, b = h["data_offsets"]
        end_max = max(end_max, b)
        np_type = {"F32": "<f4", "I64": "<i8", "I32": "<i4", "BF16": "<u2", "I8": "i1", "U8": "u1",
                   "F8_E4M3": "u1", "F8_E8M0": "u1"}[h["dtype"]]
        arr = np.frombuffer(buf[base + a : base + b], dtype=np_type).reshape(h["shape"])
        out[n] = (h["dtype"], tuple(h["shape"]), arr)
    assert base + end_max == len(buf), f"{path}: trailing bytes"
    return out


# ------------------------------------------------------------------------------------------------
# Fixture specifications
# ------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    name: str
    style: str  # "official" or "hf"
    seed: int
    T: int
    vocab: int
    hidden: int
    layer_types: list
    rates: dict  # {CSA: m, HCA: m'}
    n_hash: int
    heads: int
    head_dim: int
    rope_dim: int
    q_lora: int
    o_groups: int
    o_rank: int
    experts: int
    topk: int
    inter: int
    idx_heads: int
    idx_dim: int
    idx_topk: int
    window: int
    rope_theta: float
    compress_rope_theta: float
    yarn: dict
    swiglu_limit: float
    routed_scale: float
    logit_std: float = 3.0
    n_shards: int = 1
    tid2eid_dtype: str = "I64"
    sub_cols: int = 0  # >0: store logits on this many fixed columns only
    chunk_pattern: list = field(default_factory=lambda: [7, 1, 13, 1, 1, 37, 5, 61, 2, 90, 11, 70])
    decode_prefill: int = 5
    greedy_prompt_len: int = 24
    greedy_new: int = 16


SPECS = [
    Spec(
        name="official-fp8", style="official", seed=1001, T=300, vocab=1000, hidden=160,
        layer_types=[SWA, CSA, HCA, CSA], rates={CSA: 4, HCA: 128}, n_hash=2,
        heads=4, head_dim=64, rope_dim=16, q_lora=96, o_groups=2, o_rank=32,
        experts=8, topk=2, inter=96, idx_heads=4, idx_dim=32, idx_topk=4, window=16,
        rope_theta=10000.0, compress_rope_theta=160000.0,
        yarn={"factor": 16, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1},
        swiglu_limit=1.5, routed_scale=1.5, n_shards=2,
    ),
    Spec(
        name="hf-bf16", style="hf", seed=2002, T=200, vocab=384, hidden=96,
        layer_types=[SWA, CSA, HCA, CSA, HCA], rates={CSA: 4, HCA: 16}, n_hash=1,
        heads=8, head_dim=32, rope_dim=8, q_lora=64, o_groups=4, o_rank=16,
        experts=8, topk=3, inter=48, idx_heads=8, idx_dim=16, idx_topk=5, window=12,
        rope_theta=20000.0, compress_rope_theta=80000.0,
        yarn={"factor": 8, "original_max_position_embeddings": 512, "beta_fast": 16, "beta_slow": 1},
        swiglu_limit=1.25, routed_scale=2.5,
        chunk_pattern=[7, 1, 13, 1, 1, 29, 3, 18, 40, 2, 33, 52],
    ),
    Spec(
        name="official-vocab", style="official", seed=3003, T=48, vocab=129280, hidden=32,
        layer_types=[SWA, CSA, HCA], rates={CSA: 4, HCA: 8}, n_hash=1,
        heads=2, head_dim=32, rope_dim=8, q_lora=32, o_groups=2, o_rank=16,
        experts=4, topk=2, inter=32, idx_heads=4, idx_dim=16, idx_topk=2, window=8,
        rope_theta=10000.0, compress_rope_theta=160000.0,
        yarn={"factor": 16, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
        swiglu_limit=1.5, routed_scale=1.5, tid2eid_dtype="I32", sub_cols=2048,
        chunk_pattern=[7, 1, 13, 1, 1, 9, 16],
    ),
]


def ratio_of(spec: Spec, lt: str) -> int:
    return 0 if lt == SWA else spec.rates[lt]


def max_pos(spec: Spec) -> int:
    # YaRN's context extension: factor x original length (transformers warns when they disagree)
    return int(spec.yarn["factor"] * spec.yarn["original_max_position_embeddings"])


def official_config(spec: Spec) -> dict:
    """config.json as shipped with the official checkpoint (legacy field names)."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": spec.vocab,
        "hidden_size": spec.hidden,
        "num_hidden_layers": len(spec.layer_types),
        "num_attention_heads": spec.heads,
        "num_key_value_heads": 1,
        "head_dim": spec.head_dim,
        "qk_rope_head_dim": spec.rope_dim,
        "q_lora_rank": spec.q_lora,
        "o_groups": spec.o_groups,
        "o_lora_rank": spec.o_rank,
        "sliding_window": spec.window,
        "compress_ratios": [ratio_of(spec, lt) for lt in spec.layer_types] + [0],
        "compress_rope_theta": spec.compress_rope_theta,
        "rope_theta": spec.rope_theta,
        "rope_scaling": {"type": "yarn", **spec.yarn},
        "max_position_embeddings": max_pos(spec),
        "index_n_heads": spec.idx_heads,
        "index_head_dim": spec.idx_dim,
        "index_topk": spec.idx_topk,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "n_routed_experts": spec.experts,
        "num_experts_per_tok": spec.topk,
        "n_shared_experts": 1,
        "moe_intermediate_size": spec.inter,
        "num_hash_layers": spec.n_hash,
        "routed_scaling_factor": spec.routed_scale,
        "swiglu_limit": spec.swiglu_limit,
        "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True,
        "topk_method": "noaux_tc",
        "num_nextn_predict_layers": 1,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "expert_dtype": "fp4",
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "scale_fmt": "ue8m0",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    }


def hf_config_kwargs(spec: Spec) -> dict:
    n = len(spec.layer_types)
    return dict(
        vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=n,
        num_attention_heads=spec.heads, num_key_value_heads=1, head_dim=spec.head_dim,
        partial_rotary_factor=spec.rope_dim / spec.head_dim, q_lora_rank=spec.q_lora,
        o_groups=spec.o_groups, o_lora_rank=spec.o_rank, sliding_window=spec.window,
        layer_types=list(spec.layer_types), compress_rates=dict(spec.rates),
        mlp_layer_types=["hash_moe"] * spec.n_hash + ["moe"] * (n - spec.n_hash),
        rope_theta=spec.rope_theta, compress_rope_theta=spec.compress_rope_theta,
        rope_parameters={"rope_type": "yarn", **spec.yarn},
        max_position_embeddings=max_pos(spec), index_n_heads=spec.idx_heads, index_head_dim=spec.idx_dim,
        index_topk=spec.idx_topk, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
        n_routed_experts=spec.experts, num_experts_per_tok=spec.topk, n_shared_experts=1,
        moe_intermediate_size=spec.inter, routed_scaling_factor=spec.routed_scale,
        swiglu_limit=spec.swiglu_limit, scoring_func="sqrtsoftplus", norm_topk_prob=True,
        num_nextn_predict_layers=1, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    )


def build_configs(spec: Spec) -> tuple[dict, DeepseekV4Config]:
    """Returns (config.json dict, DeepseekV4Config used to build the reference model)."""
    if spec.style == "official":
        cfg_json = official_config(spec)
        if all(r in (0, 4, 128) for r in cfg_json["compress_ratios"]):
            # exactly what a user's from_pretrained would parse
            hf_cfg = DeepseekV4Config.from_dict(copy.deepcopy(cfg_json))
        else:
            # transformers only maps ratios 0/4/128; express other rates via layer_types/compress_rates
            hf_cfg = DeepseekV4Config(**hf_config_kwargs(spec))
        if hasattr(hf_cfg, "quantization_config"):
            delattr(hf_cfg, "quantization_config")  # build a plain float model; we dequantize ourselves
    else:
        hf_cfg = DeepseekV4Config(**hf_config_kwargs(spec))
        hf_cfg.architectures = ["DeepseekV4ForCausalLM"]
        hf_cfg.dtype = torch.bfloat16
        with tempfile.TemporaryDirectory() as tmp:  # exactly what save_pretrained writes
            hf_cfg.save_pretrained(tmp)
            with open(os.path.join(tmp, "config.json")) as f:
                cfg_json = json.load(f)
        again = DeepseekV4Config.from_dict(copy.deepcopy(cfg_json))
        assert again.to_dict() == {**hf_cfg.to_dict(), "transformers_version": again.transformers_version}
    # sanity: the HF config must describe exactly the spec
    assert hf_cfg.layer_types == spec.layer_types, hf_cfg.layer_types
    assert hf_cfg.mlp_layer_types == ["hash_moe"] * spec.n_hash + ["moe"] * (len(spec.layer_types) - spec.n_hash)
    assert dict(hf_cfg.compress_rates) == {CSA: spec.rates[CSA], HCA: spec.rates[HCA]}
    assert hf_cfg.qk_rope_head_dim == spec.rope_dim
    assert hf_cfg.rope_parameters["compress"]["rope_type"] == "yarn"
    assert hf_cfg.rope_parameters["compress"]["attention_factor"] == 1.0
    return cfg_json, hf_cfg


# ------------------------------------------------------------------------------------------------
# Parameters: draw, quantize/round to the storage format, map names
# ------------------------------------------------------------------------------------------------


def init_param(name: str, shape: tuple, spec: Spec, rng: np.random.Generator) -> np.ndarray:
    D = spec.hidden
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("embed_tokens.weight"):
        return rng.standard_normal(shape)
    if name == "lm_head.weight":
        return rng.standard_normal(shape) * spec.logit_std / math.sqrt(D)
    if "norm" in name and leaf == "weight":
        return rng.uniform(0.8, 1.2, shape)
    if leaf in ("fn", "hc_fn"):
        return rng.standard_normal(shape) / math.sqrt(shape[1])
    if leaf in ("base", "hc_base"):
        return rng.normal(0.0, 0.5, shape)
    if leaf in ("scale", "hc_scale"):
        return rng.uniform(0.5, 1.5, shape)
    if leaf == "sinks":
        return rng.normal(0.0, 1.0, shape)
    if leaf == "position_bias":
        return rng.normal(0.0, 0.5, shape)
    if leaf == "e_score_correction_bias":
        return rng.normal(0.0, 0.15, shape)
    if leaf == "tid2eid":
        v, k = shape
        return np.argsort(rng.random((v, spec.experts)), axis=1)[:, :k]
    if leaf == "gate_up_proj":  # [E, 2I, D]
        return rng.standard_normal(shape) / math.sqrt(shape[2])
    if leaf == "down_proj" and len(shape) == 3:  # [E, D, I]
        return rng.standard_normal(shape) / math.sqrt(shape[2])
    if leaf == "weight" and len(shape) == 2:  # every nn.Linear / router: [out, in]
        return rng.standard_normal(shape) / math.sqrt(shape[1])
    raise KeyError(f"no init rule for {name} {shape}")


FP8_HF_SUFFIXES = (
    "self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight", "self_attn.kv_proj.weight",
    "self_attn.o_a_proj.weight", "self_attn.o_b_proj.weight", "indexer.q_b_proj.weight",
    "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight", "shared_experts.down_proj.weight",
)
F32_KEYS = ("attn_hc.", "ffn_hc.", "hc_head.", "sinks", "position_bias", "e_score_correction_bias")


def official_name(hf: str) -> str:
    """HF parameter name -> official checkpoint key (inverse of transformers' conversion mapping)."""
    top = {
        "model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
        "model.norm.weight": "norm.weight", "model.hc_head.hc_fn": "hc_head_fn",
        "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale",
    }
    if hf in top:
        return top[hf]
    assert hf.startswith("model.layers."), hf
    i, rest = hf[len("model.layers."):].split(".", 1)
    table = [
        ("input_layernorm.weight", "attn_norm.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("attn_hc.fn", "hc_attn_fn"), ("attn_hc.base", "hc_attn_base"), ("attn_hc.scale", "hc_attn_scale"),
        ("ffn_hc.fn", "hc_ffn_fn"), ("ffn_hc.base", "hc_ffn_base"), ("ffn_hc.scale", "hc_ffn_scale"),
        ("self_attn.sinks", "attn.attn_sink"),
        ("self_attn.q_a_proj.weight", "attn.wq_a.weight"), ("self_attn.q_a_norm.weight", "attn.q_norm.weight"),
        ("self_attn.q_b_proj.weight", "attn.wq_b.weight"), ("self_attn.kv_proj.weight", "attn.wkv.weight"),
        ("self_attn.kv_norm.weight", "attn.kv_norm.weight"),
        ("self_attn.o_a_proj.weight", "attn.wo_a.weight"), ("self_attn.o_b_proj.weight", "attn.wo_b.weight"),
        ("self_attn.compressor.indexer.kv_proj.weight", "attn.indexer.compressor.wkv.weight"),
        ("self_attn.compressor.indexer.gate_proj.weight", "attn.indexer.compressor.wgate.weight"),
        ("self_attn.compressor.indexer.position_bias", "attn.indexer.compressor.ape"),
        ("self_attn.compressor.indexer.kv_norm.weight", "attn.indexer.compressor.norm.weight"),
        ("self_attn.compressor.indexer.q_b_proj.weight", "attn.indexer.wq_b.weight"),
        ("self_attn.compressor.indexer.scorer.weights_proj.weight", "attn.indexer.weights_proj.weight"),
        ("self_attn.compressor.kv_proj.weight", "attn.compressor.wkv.weight"),
        ("self_attn.compressor.gate_proj.weight", "attn.compressor.wgate.weight"),
        ("self_attn.compressor.position_bias", "attn.compressor.ape"),
        ("self_attn.compressor.kv_norm.weight", "attn.compressor.norm.weight"),
        ("mlp.gate.weight", "ffn.gate.weight"), ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
        ("mlp.gate.tid2eid", "ffn.gate.tid2eid"),
        ("mlp.shared_experts.gate_proj.weight", "ffn.shared_experts.w1.weight"),
        ("mlp.shared_experts.up_proj.weight", "ffn.shared_experts.w3.weight"),
        ("mlp.shared_experts.down_proj.weight", "ffn.shared_experts.w2.weight"),
    ]
    for a, b in table:
        if rest == a:
            return f"layers.{i}.{b}"
    raise KeyError(hf)


def make_weights(spec: Spec, shapes: dict[str, tuple]):
    """Returns (hf_values: name -> float32/int64 np array fed to HF, stored: name -> Stored)."""
    hf_vals: dict[str, np.ndarray] = {}
    stored: dict[str, Stored] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode())])
        raw = init_param(name, shape, spec, rng)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "tid2eid":
            hf_vals[name] = raw.astype(np.int64)
            key = official_name(name) if spec.style == "official" else name
            stored[key] = st_tensor(spec.tid2eid_dtype, raw)
            continue
        if spec.style == "hf":
            is_f32 = any(k in name for k in F32_KEYS) or ("norm" in name and leaf == "weight")
            if is_f32:
                v = raw.astype(np.float32)
                stored[name] = st_tensor("F32", v)
            else:
                bits = bf16_bits(raw.astype(np.float32))
                v = bf16_decode(bits)
                stored[name] = st_tensor("BF16", bits)
            hf_vals[name] = v
            continue
        # official layout
        if leaf in ("gate_up_proj", "down_proj") and ".experts." in name:
            i = name.split(".")[2]
            E = shape[0]
            deq = np.zeros(shape, dtype=np.float32)
            for e in range(E):
                if leaf == "gate_up_proj":
                    I = shape[1] // 2
                    parts = [("w1", raw[e, :I], slice(0, I)), ("w3", raw[e, I:], slice(I, 2 * I))]
                else:
                    parts = [("w2", raw[e], slice(None))]
                for wn, w, sl in parts:
                    packed, sc, d = quant_fp4_row32(w)
                    stored[f"layers.{i}.ffn.experts.{e}.{wn}.weight"] = st_tensor("I8", packed)
                    stored[f"layers.{i}.ffn.experts.{e}.{wn}.scale"] = st_tensor("F8_E8M0", sc)
                    deq[e, sl] = d
            hf_vals[name] = deq
            continue
        key = official_name(name)
        if name.endswith(FP8_HF_SUFFIXES):
            # vary the magnitude per 128x128 block so neighbouring blocks get different scales
            # (a reader that maps elements to the wrong scale block then gives wrong values)
            bo, bi = -(-shape[0] // 128), -(-shape[1] // 128)
            f = np.exp2(rng.uniform(-1.5, 1.5, (bo, bi)))
            raw = raw * np.repeat(np.repeat(f, 128, 0), 128, 1)[: shape[0], : shape[1]]
            codes, sc, deq = quant_fp8_block(raw)
            stored[key] = st_tensor("F8_E4M3", codes)
            stored[key[: -len(".weight")] + ".scale"] = st_tensor("F8_E8M0", sc)
            hf_vals[name] = deq
        elif any(k in name for k in F32_KEYS):
            v = raw.astype(np.float32)
            stored[key] = st_tensor("F32", v)
            hf_vals[name] = v
        else:
            bits = bf16_bits(raw.astype(np.float32))
            stored[key] = st_tensor("BF16", bits)
            hf_vals[name] = bf16_decode(bits)
    return hf_vals, stored


def dequant_stored(spec: Spec, files: list[str], shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Read the written checkpoint back from bytes and rebuild HF-named float tensors."""
    raw: dict[str, tuple] = {}
    for f in files:
        for k, v in read_safetensors(f).items():
            assert k not in raw, f"duplicate tensor {k}"
            raw[k] = v
    used = set()

    def get(key):
        used.add(key)
        return raw[key]

    def as_float(key):
        dt, _, a = get(key)
        if dt == "BF16":
            return bf16_decode(a)
        if dt == "F32":
            return a.astype(np.float32)
        if dt == "F8_E4M3":
            _, _, s = get(key[: -len(".weight")] + ".scale")
            return dequant_fp8_bytes(a, s)
        raise ValueError(f"{key}: unexpected dtype {dt}")

    out = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if spec.style == "hf":
            dt, _, a = get(name)
            out[name] = a.astype(np.int64) if leaf == "tid2eid" else as_float(name)
        elif leaf in ("gate_up_proj", "down_proj") and ".experts." in name:
            i = name.split(".")[2]
            mats = []
            for e in range(shape[0]):
                wns = ["w1", "w3"] if leaf == "gate_up_proj" else ["w2"]
                rows = []
                for wn in wns:
                    _, _, w = get(f"layers.{i}.ffn.experts.{e}.{wn}.weight")
                    _, _, s = get(f"layers.{i}.ffn.experts.{e}.{wn}.scale")
                    rows.append(dequant_fp4_bytes(w, s))
                mats.append(np.concatenate(rows, axis=0))
            out[name] = np.stack(mats)
        elif leaf == "tid2eid":
            out[name] = get(official_name(name))[2].astype(np.int64)
        else:
            out[name] = as_float(official_name(name))
        assert tuple(out[name].shape) == tuple(shape), (name, out[name].shape, shape)
    assert used == set(raw), f"unused stored tensors: {sorted(set(raw) - used)[:5]}"
    return out


def check_with_safetensors_lib(files: list[str]) -> None:
    """The files must open with the reference `safetensors` library (torch dtypes float8_e4m3fn,
    float8_e8m0fnu, ...) and hold the same bytes our reader sees."""
    from safetensors import safe_open

    for f in files:
        mine = read_safetensors(f)
        with safe_open(f, framework="pt") as g:
            assert set(g.keys()) == set(mine), f
            for k in g.keys():
                t = g.get_tensor(k)
                assert t.contiguous().view(torch.uint8).numpy().tobytes() == mine[k][2].tobytes(), k


def self_test_codecs() -> None:
    """Our e4m3 rounding must agree with torch's float8_e4m3fn cast (round to nearest even)."""
    rng = np.random.default_rng(12345)
    mids = E4M3_POS[:-1] + np.diff(E4M3_POS) / 2  # exact ties
    x = np.concatenate([rng.standard_normal(100000) * 100, rng.standard_normal(1000) * 0.01, mids, -mids])
    x = np.clip(x, -E4M3_MAX, E4M3_MAX)
    codes = round_to_grid(np.abs(x), E4M3_POS).astype(np.uint8) | np.where(x < 0, 0x80, 0).astype(np.uint8)
    ref = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(decode_e4m3(codes), decode_e4m3(ref)), "e4m3 rounding differs from torch"
    # e2m1 ties go to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    t = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.3])
    assert FP4_POS[round_to_grid(t, FP4_POS)].tolist() == [0, 1, 1, 2, 2, 4, 4, 6, 0.5]


def write_checkpoint(spec: Spec, d: str, stored: dict[str, Stored]) -> list[str]:
    if spec.n_shards == 1:
        path = os.path.join(d, "model.safetensors")
        write_safetensors(path, stored)
        return [path]
    names = sorted(stored)
    total = sum(len(stored[n].data) for n in names)
    shards, cur, acc = [], [], 0
    for n in names:
        if acc >= total * len(shards + [0]) / spec.n_shards and len(shards) < spec.n_shards - 1 and cur:
            shards.append(cur)
            cur = []
        cur.append(n)
        acc += len(stored[n].data)
    shards.append(cur)
    assert len(shards) == spec.n_shards
    weight_map, paths = {}, []
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{spec.n_shards:05d}.safetensors"
        write_safetensors(os.path.join(d, fname), {n: stored[n] for n in group})
        paths.append(os.path.join(d, fname))
        for n in group:
            weight_map[n] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return paths


# ------------------------------------------------------------------------------------------------
# Instrumented HF model
# ------------------------------------------------------------------------------------------------


def layer_of(mod_name: str) -> int:
    return int(mod_name.split("layers.")[1].split(".")[0])


class Probe:
    """Forward hooks recording every discrete decision and SwiGLU clamp activity."""

    def __init__(self, model: DeepseekV4ForCausalLM, cfg: DeepseekV4Config):
        self.cfg = cfg
        self.limit = cfg.swiglu_limit
        self.reset()
        for name, mod in model.named_modules():
            if isinstance(mod, hfm.DeepseekV4TopKRouter):
                mod.register_forward_hook(self._router(layer_of(name)))
            elif isinstance(mod, hfm.DeepseekV4Indexer):
                mod.register_forward_pre_hook(self._indexer_pre(layer_of(name)))
                mod.register_forward_hook(self._indexer_post(layer_of(name), mod))
                mod.scorer.register_forward_hook(self._scorer(layer_of(name)))
            elif isinstance(mod, hfm.DeepseekV4MLP):
                mod.register_forward_pre_hook(self._shared())
            elif isinstance(mod, hfm.DeepseekV4Experts):
                mod.register_forward_pre_hook(self._routed(mod))

    def reset(self):
        self.router = []  # (layer, logits [N,E], bias [E], indices [N,k])
        self.indexer = []  # dicts per indexer call
        self._pending = {}
        self.clamp = {"routed_gate": 0, "routed_up": 0, "routed_n": 0,
                      "shared_gate": 0, "shared_up": 0, "shared_n": 0}

    def _router(self, layer):
        def hook(mod, args, out):
            logits, _, idx = out
            self.router.append((layer, logits.detach().double().numpy(),
                                mod.e_score_correction_bias.detach().double().numpy(), idx.numpy()))
        return hook

    def _indexer_pre(self, layer):
        def hook(mod, args):
            self._pending[layer] = {"layer": layer, "pos": args[2][0].numpy().copy()}
        return hook

    def _scorer(self, layer):
        def hook(mod, args, out):
            self._pending[layer]["scores"] = out[0].detach().double().numpy()
        return hook

    def _indexer_post(self, layer, mod):
        def hook(m, args, out):
            rec = self._pending.pop(layer)
            rec["sel"] = out[0].numpy()
            rec["m"] = mod.compress_rate
            rec["k"] = mod.index_topk
            self.indexer.append(rec)
        return hook

    def _shared(self):
        def hook(mod, args):
            x = args[0]
            g, u = mod.gate_proj(x), mod.up_proj(x)
            self.clamp["shared_gate"] += int((g > self.limit).sum())
            self.clamp["shared_up"] += int((u.abs() > self.limit).sum())
            self.clamp["shared_n"] += g.numel()
        return hook

    def _routed(self, mod):
        def hook(m, args):
            x, idx = args[0], args[1]
            I = mod.intermediate_dim
            for e in torch.unique(idx).tolist():
                tok = (idx == e).any(dim=-1).nonzero()[:, 0]
                gu = x[tok] @ mod.gate_up_proj[e].T
                self.clamp["routed_gate"] += int((gu[:, :I] > self.limit).sum())
                self.clamp["routed_up"] += int((gu[:, I:].abs() > self.limit).sum())
                self.clamp["routed_n"] += tok.numel() * I
        return hook

    # ---- margins -------------------------------------------------------------------------
    def router_margins(self, row: int | None = None) -> dict[int, np.ndarray]:
        """layer -> relative margin per row between the k-th and (k+1)-th of score+bias
        (only `row` of each recorded call if given)."""
        out = {}
        for layer, logits, bias, idx in self.router:
            if row is not None:
                logits, idx = logits[row : row + 1], idx[row : row + 1]
            sp = np.where(logits > 20, logits, np.log1p(np.exp(np.minimum(logits, 20))))
            v = np.sqrt(sp) + bias
            k = idx.shape[1]
            srt = -np.sort(-v, axis=1)
            rel = (srt[:, k - 1] - srt[:, k]) / np.abs(v).max(axis=1)
            # HF's selection must be the exact top-k set
            mine = np.sort(np.argsort(-v, axis=1, kind="stable")[:, :k], axis=1)
            assert np.array_equal(mine, np.sort(idx, axis=1)), f"router selection mismatch in layer {layer}"
            out.setdefault(layer, []).append(rel)
        return {k: np.concatenate(v) for k, v in out.items()}

    def indexer_margins(self, row: int | None = None) -> dict[int, np.ndarray]:
        """layer -> relative margin per query row at the index_topk boundary among valid entries
        (inf where all valid entries are selected; only `row` of each call if given)."""
        out = {}
        for rec in self.indexer:
            sc, pos, m, K, sel = rec["scores"], rec["pos"], rec["m"], rec["k"], rec["sel"]
            if row is not None:
                sc, pos, sel = sc[row : row + 1], pos[row : row + 1], sel[row : row + 1]
            rel = np.full(len(pos), np.inf)
            for r, p in enumerate(pos):
                nvalid = min((int(p) + 1) // m, sc.shape[1])
                if nvalid <= K:
                    chosen = set(int(x) for x in sel[r] if x >= 0)
                    assert chosen == set(range(nvalid)), "indexer must select every valid entry"
                    continue
                s = sc[r, :nvalid]
                srt = -np.sort(-s)
                scale = np.abs(s).max()
                rel[r] = (srt[K - 1] - srt[K]) / scale if scale > 0 else 0.0
                if rel[r] > 0:
                    mine = set(np.argsort(-s, kind="stable")[:K].tolist())
                    assert mine == set(int(x) for x in sel[r] if x >= 0), "indexer selection mismatch"
            out.setdefault(rec["layer"], []).append(rel)
        return {k: np.concatenate(v) for k, v in out.items()}


def argmax_margins(logits: np.ndarray) -> np.ndarray:
    top2 = -np.sort(-logits, axis=-1)[..., :2]
    return (top2[..., 0] - top2[..., 1]) / np.abs(logits).max(axis=-1)


def row_min_margin(probe: Probe, logits_last: np.ndarray, row: int) -> float:
    """Smallest decision margin of one query row (all layers) for a forward over [0..row]."""
    vals = [argmax_margins(logits_last)]
    for m in probe.router_margins(row).values():
        vals.append(m[0])
    for m in probe.indexer_margins(row).values():
        vals.append(m[0])
    return float(min(vals))


def load_model(hf_cfg: DeepseekV4Config, hf_vals: dict[str, np.ndarray]) -> DeepseekV4ForCausalLM:
    model = DeepseekV4ForCausalLM._from_config(
        hf_cfg, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf_vals.items()}
    model.load_state_dict(sd, strict=True)
    model.eval()
    for k, v in model.state_dict().items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
    return model


@torch.no_grad()
def forward_full(model, ids: np.ndarray, keep_last: bool = False) -> np.ndarray:
    t = torch.from_numpy(ids[None].astype(np.int64))
    out = model(input_ids=t, use_cache=False, logits_to_keep=1 if keep_last else 0)
    return out.logits[0].double().numpy()


@torch.no_grad()
def forward_chunked(model, hf_cfg, ids: np.ndarray, chunks: list[int], keep=None) -> np.ndarray:
    cache = DynamicCache(config=hf_cfg)
    rows, s = [], 0
    for c in chunks:
        t = torch.from_numpy(ids[None, s : s + c].astype(np.int64))
        out = model(input_ids=t, past_key_values=cache, use_cache=True)
        lg = out.logits[0]
        rows.append((lg[:, keep] if keep is not None else lg).double().numpy())
        s += c
    assert s == len(ids)
    return np.concatenate(rows, axis=0)


def chunks_for(spec: Spec, T: int) -> list[int]:
    out, s = [], 0
    for c in spec.chunk_pattern:
        if s + c >= T:
            break
        out.append(c)
        s += c
    out.append(T - s)
    return out


# ------------------------------------------------------------------------------------------------
# Prompt construction
# ------------------------------------------------------------------------------------------------


def build_prompt(model, probe: Probe, spec: Spec, length: int, stream: int, prefix: list[int],
                 log_every: int = 0) -> tuple[np.ndarray, int]:
    """Random token ids, chosen position by position so that every decision at each position
    clears BUILD_MARGIN (decisions at row t depend on tokens 0..t only). Returns (ids, #rejects)."""
    rng = np.random.default_rng([spec.seed, 77, stream])
    ids = list(prefix)
    rejects = 0
    for t in range(len(prefix)):  # fixed prefix (BOS): must pass as is
        probe.reset()
        lg = forward_full(model, np.array(ids[: t + 1]), keep_last=True)[-1]
        if row_min_margin(probe, lg, t) < BUILD_MARGIN:
            raise RuntimeError("fixed prefix fails margin; change the model seed")
    while len(ids) < length:
        t = len(ids)
        for attempt in range(200):
            cand = int(rng.integers(0, spec.vocab))
            probe.reset()
            lg = forward_full(model, np.array(ids + [cand]), keep_last=True)[-1]
            if row_min_margin(probe, lg, t) >= BUILD_MARGIN:
                break
            rejects += 1
        else:
            raise RuntimeError(f"no acceptable token at position {t}")
        ids.append(cand)
        if log_every and t % log_every == 0:
            print(f"    prompt position {t}/{length}", flush=True)
    return np.array(ids, dtype=np.int64), rejects


@torch.no_grad()
def greedy(model, hf_cfg, prompt: np.ndarray, n: int) -> np.ndarray:
    cache = DynamicCache(config=hf_cfg)
    out = model(input_ids=torch.from_numpy(prompt[None]), past_key_values=cache, use_cache=True)
    gen = []
    for _ in range(n):
        nxt = int(out.logits[0, -1].argmax())
        gen.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
    return np.array(gen, dtype=np.int64)


def full_check(probe: Probe, logits: np.ndarray) -> dict:
    """Minimum margins over a full one-call forward (probe must hold exactly that forward)."""
    r = {"argmax": argmax_margins(logits)}
    for k, v in probe.router_margins().items():
        r[f"router.L{k}"] = v
    for k, v in probe.indexer_margins().items():
        r[f"indexer.L{k}"] = v
    return {k: float(np.min(v)) if len(v) else float("inf") for k, v in r.items()}


# ------------------------------------------------------------------------------------------------
# One fixture
# ------------------------------------------------------------------------------------------------


def make_fixture(spec: Spec, out_root: str, hf_check: bool) -> dict:
    t0 = time.time()
    d = os.path.join(out_root, spec.name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        if f.endswith((".safetensors", ".json")):
            os.remove(os.path.join(d, f))
    cfg_json, hf_cfg = build_configs(spec)

    shapes_model = DeepseekV4ForCausalLM._from_config(hf_cfg, dtype=torch.float32)
    shapes = {k: tuple(v.shape) for k, v in shapes_model.state_dict().items()}
    del shapes_model
    hf_vals, stored = make_weights(spec, shapes)

    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg_json, f, indent=2, sort_keys=(spec.style == "hf"))
        f.write("\n")
    files = write_checkpoint(spec, d, stored)

    # independent read-back of the written bytes
    back = dequant_stored(spec, files, shapes)
    check_with_safetensors_lib(files)
    for k in shapes:
        assert np.array_equal(back[k], hf_vals[k]), f"read-back mismatch for {k}"
        if back[k].dtype == np.float32:
            assert np.array_equal(np.signbit(back[k]), np.signbit(hf_vals[k])), k

    model = load_model(hf_cfg, hf_vals)
    probe = Probe(model, hf_cfg)
    report: dict = {"name": spec.name}

    # rope sanity: YaRN blend active (some pair neither original nor fully scaled)
    rot = model.model.rotary_emb
    inv = rot.compress_inv_freq.double().numpy()
    r = spec.rope_dim
    base = spec.compress_rope_theta ** (-np.arange(0, r, 2) / r)
    ratio = inv / base
    f = spec.yarn["factor"]
    assert np.any((ratio < 1 - 1e-6) & (ratio > 1 / f + 1e-6)), f"YaRN blend inactive: {ratio}"
    report["yarn_inv_freq_ratio"] = [round(float(x), 6) for x in ratio]

    # main prompt
    t1 = time.time()
    ids, rej = build_prompt(model, probe, spec, spec.T, stream=0, prefix=[], log_every=100)
    report["prompt_rejects"] = rej
    probe.reset()
    logits = forward_full(model, ids)
    margins = full_check(probe, logits)
    clamp = dict(probe.clamp)
    t2 = time.time()

    chunks = chunks_for(spec, spec.T)
    decode_chunks = [spec.decode_prefill] + [1] * (spec.T - spec.decode_prefill)
    V = spec.vocab
    argmax = logits.argmax(axis=1)
    maxval = logits.max(axis=1)
    if spec.sub_cols:
        crng = np.random.default_rng([spec.seed, 99])
        top2 = np.argsort(-logits, axis=1)[:, :2].reshape(-1)
        must = np.unique(np.concatenate([argmax, top2]))
        rest = np.setdiff1d(np.arange(V), must)
        extra = crng.choice(rest, size=spec.sub_cols - len(must), replace=False)
        cols = np.sort(np.concatenate([must, extra]))
        keep = torch.from_numpy(cols)
    else:
        cols, keep = None, None
    lg_chunk = forward_chunked(model, hf_cfg, ids, chunks, keep)
    lg_dec = forward_chunked(model, hf_cfg, ids, decode_chunks, keep)
    ref_cols = logits[:, cols] if cols is not None else logits
    report["maxdiff_chunked"] = float(np.abs(lg_chunk - ref_cols).max())
    report["maxdiff_decode"] = float(np.abs(lg_dec - ref_cols).max())
    assert report["maxdiff_chunked"] < 1e-4 and report["maxdiff_decode"] < 1e-4, report
    t3 = time.time()

    # greedy continuation
    P, N = spec.greedy_prompt_len, spec.greedy_new
    for attempt in range(50):
        gp, _ = build_prompt(model, probe, spec, P, stream=1000 + attempt, prefix=[0])
        gen = greedy(model, hf_cfg, gp, N)
        seq = np.concatenate([gp, gen[:-1]])
        probe.reset()
        lg = forward_full(model, seq)
        gm = full_check(probe, lg)
        if min(gm.values()) >= FINAL_MARGIN and np.array_equal(lg[P - 1 :].argmax(axis=1), gen):
            break
    else:
        raise RuntimeError("no greedy prompt with clear margins")
    report["greedy_attempts"] = attempt + 1
    report["greedy_margins"] = gm
    report["greedy_clamp"] = dict(probe.clamp)
    # cross-check with HF generate (min_new_tokens keeps EOS from stopping it)
    with torch.no_grad():
        inp = torch.from_numpy(gp[None])
        # explicit all-ones mask: with pad_token_id == BOS, generate would mask out the BOS
        g2 = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=N,
                            min_new_tokens=N, do_sample=False, pad_token_id=2)
    assert np.array_equal(g2[0, P:].numpy(), gen), (g2, gen)
    t4 = time.time()

    report["margins"] = margins
    report["clamp"] = clamp
    assert min(margins.values()) >= FINAL_MARGIN, margins
    for k in ("routed_gate", "routed_up", "shared_gate", "shared_up"):
        assert clamp[k] > 0, f"SwiGLU clamp never fired: {k}"

    ref = {
        "ids": st_tensor("I64", ids),
        "argmax": st_tensor("I64", argmax.astype(np.int64)),
        "maxval": st_tensor("F32", maxval.astype(np.float32)),
        "chunks": st_tensor("I64", np.array(chunks, dtype=np.int64)),
        "decode_prefill": st_tensor("I64", np.array([spec.decode_prefill], dtype=np.int64)),
        "greedy_prompt": st_tensor("I64", gp),
        "greedy_ids": st_tensor("I64", gen),
    }
    if cols is not None:
        ref["logit_cols"] = st_tensor("I64", cols.astype(np.int64))
        ref["logits_sub"] = st_tensor("F32", ref_cols.astype(np.float32))
        ref["logits_chunked_sub"] = st_tensor("F32", lg_chunk.astype(np.float32))
        ref["logits_decode_sub"] = st_tensor("F32", lg_dec.astype(np.float32))
    else:
        ref["logits"] = st_tensor("F32", logits.astype(np.float32))
        ref["logits_chunked"] = st_tensor("F32", lg_chunk.astype(np.float32))
        ref["logits_decode"] = st_tensor("F32", lg_dec.astype(np.float32))
    write_safetensors(os.path.join(d, "reference.safetensors"), ref, {
        "format": "pt", "generator": "tools/make_fixtures.py",
        "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]})

    if hf_check:
        report["hf_from_pretrained"] = hf_load_check(spec, d, hf_vals)

    meta = {
        "fixture": spec.name, "layout": spec.style, "seed": spec.seed,
        "transformers": transformers.__version__, "dtype": "float32",
        "layer_types": spec.layer_types, "compress_rates": spec.rates,
        "T": spec.T, "chunks": chunks, "decode_prefill": spec.decode_prefill,
        "greedy_prompt_len": P, "greedy_new": N,
        "min_relative_margins": {k: float(f"{v:.4g}") for k, v in margins.items()},
        "min_relative_margins_greedy": {k: float(f"{v:.4g}") for k, v in gm.items()},
    }
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")

    report["timing_s"] = {"weights+load": round(t1 - t0, 1), "prompt+onecall": round(t2 - t1, 1),
                          "chunked+decode": round(t3 - t2, 1), "greedy": round(t4 - t3, 1),
                          "total": round(time.time() - t0, 1)}
    report["files"] = {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))}
    return report


def hf_load_check(spec: Spec, d: str, hf_vals: dict[str, np.ndarray]) -> str:
    """Load the fixture directory through transformers' own from_pretrained and compare."""
    try:
        m = DeepseekV4ForCausalLM.from_pretrained(d, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        return f"from_pretrained failed: {type(e).__name__}: {str(e)[:200]}"
    sd = m.state_dict()
    bad = []
    for k, v in hf_vals.items():
        if k not in sd:
            bad.append(f"{k} missing")
            continue
        got = sd[k]
        got = got.numpy() if got.dtype == torch.int64 else got.float().numpy()
        if got.shape != v.shape or not np.array_equal(got, v):
            bad.append(k)
    # transformers' Fp8Dequantize infers the block size as shape // scale_grid, which is wrong for
    # partial edge blocks (e.g. 160 columns with 2 scale columns -> blocks of 80).
    expected = set()
    if spec.style == "official":
        for k, v in hf_vals.items():
            if k.endswith(FP8_HF_SUFFIXES):
                o, i = v.shape
                if (o > 128 and o % 128) or (i > 128 and i % 128):
                    expected.add(k)
    unexpected = [k for k in bad if k not in expected]
    assert not unexpected, f"from_pretrained disagrees on {unexpected[:5]}"
    if not bad:
        return "identical"
    return (f"identical except {len(bad)} FP8 tensors with partial 128-blocks that transformers "
            f"dequantizes with an evenly split block size: {sorted(bad)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures"))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--hf-check", action="store_true",
                    help="also load each fixture with transformers' from_pretrained and compare weights")
    args = ap.parse_args()
    assert transformers.__version__ == "5.23.0", transformers.__version__
    self_test_codecs()
    t0 = time.time()
    for spec in SPECS:
        if args.only and spec.name not in args.only:
            continue
        print(f"== {spec.name}", flush=True)
        rep = make_fixture(spec, os.path.abspath(args.out), args.hf_check)
        print(json.dumps(rep, indent=1), flush=True)
    print(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
