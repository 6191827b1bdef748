#!/usr/bin/env python3
"""MLX-quantized fixtures for dsv4: one small official FP8/FP4 checkpoint (`mlx-src`, built and
referenced by make_fixtures.py's machinery) and, for each quantization type, the same weights
quantized by MLX itself (`mlx.core.quantize`, mlx 0.32) and written in the mlx-lm layout
(`model.layers.N.attn.wq_a.{weight,scales,biases}`, stacked `ffn.switch_mlp.*`, `quantization` in
config.json), with transformers' float32 logits computed on the *dequantized* weights of that
checkpoint (decoded here with numpy, independently of MLX and of dsv4).

Which tensors are quantized (the same rule as `dsv4 convert`): every tensor the official release
quantizes (those with a `.scale`: attention projections, indexer `wq_b`, shared and routed
experts) plus the embedding and the lm head; compressor, indexer-compressor, `weights_proj`,
router, norms and hyper-connection parameters keep their stored dtype. Exact conversions where
they exist: official FP4 experts → mxfp4 keep their bytes, FP8 128x128 → mxfp8 repeats each block
scale (as mlx-lm's `sanitize` does).

Usage:  python tools/make_mlx_fixtures.py [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

SRC = mf.Spec(
    name="mlx-src", style="official", seed=4005, T=160, vocab=512, hidden=128,
    layer_types=[mf.SWA, mf.CSA, mf.HCA], rates={mf.CSA: 4, mf.HCA: 128}, n_hash=1,
    heads=2, head_dim=64, rope_dim=16, q_lora=64, o_groups=2, o_rank=32,
    experts=4, topk=2, inter=64, idx_heads=2, idx_dim=32, idx_topk=4, window=16,
    rope_theta=10000.0, compress_rope_theta=160000.0,
    yarn={"factor": 16, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1},
    swiglu_limit=1.5, routed_scale=1.5, n_shards=2,
    chunk_pattern=[7, 1, 13, 1, 1, 37, 5, 61],
    greedy_prompt_len=12, greedy_new=8,
)

# name -> (recipe as `dsv4 convert --quant` spells it, group size)
VARIANTS = {
    "mlx-q4": ("q4", 64),
    "mlx-q8": ("q8", 64),
    "mlx-q3g32": ("q3", 32),
    "mlx-mxfp4": ("mxfp4", 32),
    "mlx-mxfp8": ("mxfp8", 32),
    "mlx-mixed": ("mixed-8-mxfp4", 64),
}

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def mode_for(recipe: str, group: int, module: str):
    """(mode, bits, group) for an official module name, as dsv4 convert chooses."""
    routed = ".ffn.experts." in module
    if recipe.startswith("mixed-"):
        a, e = recipe[len("mixed-"):].split("-")
        recipe = e if routed else a
        recipe = recipe if recipe.startswith("mx") else f"q{recipe}"
    if recipe == "mxfp4":
        return ("mxfp4", 4, 32)
    if recipe == "mxfp8":
        return ("mxfp8", 8, 32)
    return ("affine", int(recipe[1:]), group)


def mlx_module(official: str) -> str:
    """Official module path -> mlx-lm module path."""
    top = {"embed": "model.embed_tokens", "head": "lm_head"}
    if official in top:
        return top[official]
    p = official.split(".")
    assert p[0] == "layers"
    rest = ".".join(p[2:])
    for a, b in (("shared_experts.w1", "shared_experts.gate_proj"),
                 ("shared_experts.w3", "shared_experts.up_proj"),
                 ("shared_experts.w2", "shared_experts.down_proj")):
        rest = rest.replace(a, b)
    return f"model.layers.{p[1]}.{rest}"


def mlx_plain_name(official: str) -> str:
    """Official name of an unquantized tensor -> mlx-lm name."""
    fixed = {"norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.fn",
             "hc_head_base": "model.hc_head.base", "hc_head_scale": "model.hc_head.scale"}
    if official in fixed:
        return fixed[official]
    p = official.split(".")
    rest = ".".join(p[2:])
    for sub in ("attn", "ffn"):
        for param in ("fn", "base", "scale"):
            if rest == f"hc_{sub}_{param}":
                rest = f"{sub}_hc.{param}"
    rest = rest.replace("ffn.gate.bias", "ffn.gate.e_score_correction_bias")
    return f"model.layers.{p[1]}.{rest}"


def quantize(w: np.ndarray, mode: str, bits: int, group: int):
    """MLX's own quantizer on a bf16 copy of w (exactly representable: w decodes from FP8/FP4)."""
    a = mx.array(w.astype(np.float32)).astype(mx.bfloat16)
    assert np.array_equal(np.array(a.astype(mx.float32)), w), "weight not bf16-exact"
    if mode == "affine":
        q, s, b = mx.quantize(a, group_size=group, bits=bits, mode="affine")
        return np.array(q), np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32))
    q, s = mx.quantize(a, group_size=32, bits=bits, mode=mode)
    return np.array(q), np.array(s), None


def dequantize(q: np.ndarray, s: np.ndarray, b, mode: str, bits: int, group: int) -> np.ndarray:
    """Independent numpy decoder (f32: scale·q + bias; microscaling: value · 2^(s-127))."""
    rows = q.shape[0]
    by = np.ascontiguousarray(q).view(np.uint8).reshape(rows, -1)
    if mode == "affine":
        bitsarr = np.unpackbits(by, axis=1, bitorder="little")
        n = bitsarr.shape[1] // bits
        codes = (bitsarr[:, : n * bits].reshape(rows, n, bits).astype(np.uint32)
                 * (1 << np.arange(bits, dtype=np.uint32))).sum(-1).astype(np.float32)
        sc = np.repeat(s.astype(np.float32), group, axis=1)
        bi = np.repeat(b.astype(np.float32), group, axis=1)
        return (codes * sc + bi).astype(np.float32)
    scale = np.repeat(mf.decode_e8m0(s.astype(np.uint8)), 32, axis=1).astype(np.float32)
    if mode == "mxfp4":
        vals = np.stack([E2M1[by & 15], E2M1[by >> 4]], axis=-1).reshape(rows, -1)
    else:
        vals = mf.decode_e4m3(by).astype(np.float32)
    return (vals * scale).astype(np.float32)


def bf16(a: np.ndarray) -> mf.Stored:
    return mf.st_tensor("BF16", mf.bf16_bits(a.astype(np.float32)))


def u32(a: np.ndarray) -> mf.Stored:
    b = np.ascontiguousarray(a).astype("<u4")
    return mf.Stored("U32", tuple(int(d) for d in b.shape), b.tobytes())


def make_variant(src_dir: str, out_dir: str, recipe: str, group: int, hf_vals_src: dict, shapes: dict,
                 hf_cfg, src_model) -> dict:
    raw = {}
    for f in sorted(os.listdir(src_dir)):
        if f.startswith("model-") and f.endswith(".safetensors"):
            raw.update(mf.read_safetensors(os.path.join(src_dir, f)))
    out: dict[str, mf.Stored] = {}
    deq: dict[str, np.ndarray] = {}  # official weight name -> dequantized f32
    modes: dict[str, tuple] = {}
    L, E = len(SRC.layer_types), SRC.experts

    def quant_one(name: str):
        """Official module `name` -> (packed, scales, biases, mode triple), exact paths first."""
        mode, bits, g = mode_for(recipe, group, name)
        dt, _, w = raw[name + ".weight"]
        sc = raw.get(name + ".scale")
        if dt == "I8" and mode == "mxfp4":  # official FP4 is mxfp4 byte for byte
            q = np.ascontiguousarray(w).view(np.uint8).reshape(w.shape[0], -1).view("<u4")
            return q, sc[2].astype(np.uint8), None, (mode, bits, g)
        if dt == "F8_E4M3" and mode == "mxfp8":  # repeat each 128x128 block scale per 32 inputs
            o, i = w.shape
            s = np.repeat(np.repeat(sc[2].astype(np.uint8), 128, 0), 4, 1)[:o, : i // 32]
            q = np.ascontiguousarray(w).view(np.uint8).reshape(o, -1).view("<u4")
            return q, np.ascontiguousarray(s), None, (mode, bits, g)
        if dt == "I8":
            f = mf.dequant_fp4_bytes(w, sc[2])
        elif dt == "F8_E4M3":
            f = mf.dequant_fp8_bytes(w, sc[2])
        else:
            assert dt == "BF16", (name, dt)
            f = mf.bf16_decode(w)
        q, s, b = quantize(f, mode, bits, g)
        return q, s, b, (mode, bits, g)

    def put(mlx_name: str, q, s, b, m):
        out[mlx_name + ".weight"] = u32(q)
        if m[0] == "affine":
            out[mlx_name + ".scales"] = bf16(s)
            out[mlx_name + ".biases"] = bf16(b)
        else:
            out[mlx_name + ".scales"] = mf.st_tensor("U8", s)
        modes[mlx_name] = m

    quantized = {k[: -len(".scale")] for k in raw if k.endswith(".scale")} | {"embed", "head"}
    routed = {n for n in quantized if ".ffn.experts." in n}
    for name in sorted(quantized - routed):
        q, s, b, m = quant_one(name)
        put(mlx_module(name), q, s, b, m)
        deq[name] = dequantize(q, s, b, *m)
    for i in range(L):
        for w, mlx in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            parts = [quant_one(f"layers.{i}.ffn.experts.{e}.{w}") for e in range(E)]
            m = parts[0][3]
            q = np.stack([p[0] for p in parts])
            s = np.stack([p[1] for p in parts])
            b = np.stack([p[2] for p in parts]) if m[0] == "affine" else None
            put(f"model.layers.{i}.ffn.switch_mlp.{mlx}", q, s, b, m)
            for e, p in enumerate(parts):
                deq[f"layers.{i}.ffn.experts.{e}.{w}"] = dequantize(p[0], p[1], p[2], *m)
    for k, (dt, shape, a) in raw.items():
        base = k.rsplit(".", 1)[0]
        if k.endswith(".scale") or base in quantized:
            continue
        out[mlx_plain_name(k)] = mf.Stored(dt, shape, a.tobytes())

    # config.json: the source config without the FP8 section, plus MLX's `quantization`
    with open(os.path.join(src_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    counts: dict[tuple, int] = {}
    for m in modes.values():
        counts[m] = counts.get(m, 0) + 1
    default = modes[f"model.layers.0.ffn.switch_mlp.gate_proj"]
    qsec = {"group_size": default[2], "bits": default[1], "mode": default[0]}
    for k in sorted(modes):
        if modes[k] != default:
            qsec[k] = {"group_size": modes[k][2], "bits": modes[k][1], "mode": modes[k][0]}
    cfg["quantization"] = qsec
    cfg["quantization_config"] = qsec
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, f))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    mf.ST_ITEMSIZE["U32"] = 4
    mf.write_safetensors(os.path.join(out_dir, "model.safetensors"), out, {"format": "mlx"})

    # reference on the dequantized weights, in transformers' names
    vals = dict(hf_vals_src)
    for hf in shapes:
        leaf = hf.rsplit(".", 1)[-1]
        if leaf in ("gate_up_proj", "down_proj") and ".experts." in hf:
            i = hf.split(".")[2]
            ws = ["w1", "w3"] if leaf == "gate_up_proj" else ["w2"]
            vals[hf] = np.stack([np.concatenate([deq[f"layers.{i}.ffn.experts.{e}.{w}"] for w in ws])
                                 for e in range(E)])
            continue
        off = mf.official_name(hf) if hf not in ("model.embed_tokens.weight", "lm_head.weight") else \
            {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight"}[hf]
        base = off[: -len(".weight")] if off.endswith(".weight") else off
        if base in deq:
            vals[hf] = deq[base]
    model = mf.load_model(hf_cfg, vals)
    probe = mf.Probe(model, hf_cfg)
    # A prompt of this model's own whose decisions (router, indexer, argmax) all clear the margin:
    # quantization moves scores, so the source prompt can sit on ties here.
    ids, _ = mf.build_prompt(model, probe, SRC, SRC.T, stream=0, prefix=[])
    probe.reset()
    logits = mf.forward_full(model, ids)
    margins = mf.full_check(probe, logits)
    assert min(margins.values()) >= mf.FINAL_MARGIN, margins
    ref_src = mf.forward_full(src_model, ids)
    ref = {
        "ids": mf.st_tensor("I64", ids),
        "logits": mf.st_tensor("F32", logits.astype(np.float32)),
        "argmax": mf.st_tensor("I64", logits.argmax(axis=1).astype(np.int64)),
        # the unquantized model on the same prompt (for the quality figures)
        "logits_unquantized": mf.st_tensor("F32", ref_src.astype(np.float32)),
    }
    mf.write_safetensors(os.path.join(out_dir, "reference.safetensors"), ref, {
        "format": "pt", "generator": "tools/make_mlx_fixtures.py", "mlx": mx.__version__})
    rel = np.abs(logits - ref_src).max(axis=1) / np.abs(ref_src).max(axis=1)
    top1 = float((logits.argmax(1) == ref_src.argmax(1)).mean())
    meta = {"fixture": os.path.basename(out_dir), "source": "mlx-src", "recipe": recipe,
            "group_size": group, "mlx": mx.__version__, "quantization": qsec,
            "min_relative_margins": {k: float(f"{v:.4g}") for k, v in margins.items()},
            "vs_unquantized": {"max_row_rel_err": float(f"{rel.max():.4g}"),
                               "mean_row_rel_err": float(f"{rel.mean():.4g}"), "top1": top1}}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures"))
    ap.add_argument("--skip-src", action="store_true", help="reuse an existing mlx-src fixture")
    args = ap.parse_args()
    root = os.path.abspath(args.out)
    if not args.skip_src:
        print(json.dumps(mf.make_fixture(SRC, root, False), indent=1), flush=True)
    src = os.path.join(root, SRC.name)
    cfg_json, hf_cfg = mf.build_configs(SRC)
    shapes_model = mf.DeepseekV4ForCausalLM._from_config(hf_cfg, dtype=torch.float32)
    shapes = {k: tuple(v.shape) for k, v in shapes_model.state_dict().items()}
    del shapes_model
    files = sorted(os.path.join(src, f) for f in os.listdir(src) if f.startswith("model-"))
    hf_vals = mf.dequant_stored(SRC, files, shapes)
    src_model = mf.load_model(hf_cfg, hf_vals)
    for name, (recipe, group) in VARIANTS.items():
        meta = make_variant(src, os.path.join(root, name), recipe, group, hf_vals, shapes, hf_cfg,
                            src_model)
        print(name, json.dumps(meta["vs_unquantized"]), "margins", min(meta["min_relative_margins"].values()),
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
