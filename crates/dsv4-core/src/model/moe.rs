//! Mixture of experts: sqrt-softplus router (hash-routed or biased top-k selection), normalized
//! and scaled routing weights, clamped SwiGLU experts, plus the shared expert.

use super::weights::{Expert, MoeWeights, Router};
use crate::config::ModelConfig;
use crate::cpu::linear::forward_one_many;
use crate::numerics::{gemm_input, Numerics};

#[inline]
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// An expert's routing score from its router logit: sqrt(softplus(logit)).
#[inline]
pub fn route_score(logit: f32) -> f32 {
    softplus(logit).sqrt()
}

/// Expert picks of one token: ids and routing weights.
pub type Routing = Vec<(usize, f32)>;

/// Chooses experts for each of `l` tokens.
pub fn route(c: &ModelConfig, w: &MoeWeights, x: &[f32], ids: &[u32], l: usize) -> Vec<Routing> {
    let e = c.n_routed_experts;
    let k = c.num_experts_per_tok;
    let logits = w.gate.apply(x, l);
    (0..l)
        .map(|t| {
            let s: Vec<f32> = logits[t * e..(t + 1) * e]
                .iter()
                .map(|&v| route_score(v))
                .collect();
            let picks: Vec<usize> = match &w.router {
                Router::Hash { tid2eid } => {
                    let id = ids[t] as usize;
                    tid2eid[id * k..(id + 1) * k]
                        .iter()
                        .map(|&x| x as usize)
                        .collect()
                }
                Router::TopK { bias } => {
                    let mut order: Vec<usize> = (0..e).collect();
                    let key = |i: usize| s[i] + bias[i];
                    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
                    order.truncate(k);
                    order
                }
            };
            let sum: f32 = picks.iter().map(|&i| s[i]).sum::<f32>() + 1e-20;
            picks
                .into_iter()
                .map(|i| (i, s[i] / sum * c.routed_scaling_factor))
                .collect()
        })
        .collect()
}

/// `w2 · (r ⊙ silu(min(w1·x, λ)) ⊙ clamp(w3·x, −λ, λ))` for `m` rows of `x`, where `r` is each
/// row's routing weight when given (applied before `w2`, as the official code does) — with
/// `act_quant`, the GEMM inputs are FP8-rounded.
pub fn expert_forward(
    ex: &Expert,
    x: &[f32],
    m: usize,
    limit: Option<f32>,
    route_w: Option<&[f32]>,
    act_quant: bool,
) -> Vec<f32> {
    let xin = gemm_input(x, ex.w1.inp, act_quant);
    let mut g = ex.w1.apply(&xin, m);
    let u = ex.w3.apply(&xin, m);
    activate(&mut g, &u, ex.w1.out, limit, route_w);
    ex.w2.apply(&gemm_input(&g, ex.w1.out, act_quant), m)
}

/// `g ← silu(min(g, λ)) ⊙ clamp(u, −λ, λ)` (no clamp without a limit) for rows of `width`,
/// each then scaled by its routing weight when given.
fn activate(g: &mut [f32], u: &[f32], width: usize, limit: Option<f32>, route_w: Option<&[f32]>) {
    for (g, &u) in g.iter_mut().zip(u) {
        let (gv, uv) = match limit {
            Some(lim) => (g.min(lim), u.clamp(-lim, lim)),
            None => (*g, u),
        };
        *g = gv / (1.0 + (-gv).exp()) * uv;
    }
    if let Some(r) = route_w {
        for (row, &r) in g.chunks_mut(width).zip(r) {
            row.iter_mut().for_each(|v| *v *= r);
        }
    }
}

/// One token's experts — the shared one, then its picks by ascending expert id, as [`forward`]
/// visits them — with the gate and up products of all of them in one parallel region and
/// every down projection in another ([`forward_one_many`]): the same values, bit for bit, as
/// [`expert_forward`] one expert after another, with 2 thread hand-offs instead of 3 per expert.
fn experts_one_token(
    c: &ModelConfig,
    w: &MoeWeights,
    x: &[f32],
    picks: &Routing,
    aq: bool,
) -> Vec<f32> {
    let d = c.hidden_size;
    let mut exs: Vec<(&Expert, Option<f32>)> = w.shared.iter().map(|sh| (sh, None)).collect();
    let mut picks = picks.clone();
    picks.sort_by_key(|&(e, _)| e);
    exs.extend(picks.iter().map(|&(e, wt)| (&w.experts[e], Some(wt))));
    let xin = gemm_input(x, d, aq);
    let mut gs: Vec<Vec<f32>> = exs.iter().map(|(ex, _)| vec![0f32; ex.w1.out]).collect();
    let mut us: Vec<Vec<f32>> = exs.iter().map(|(ex, _)| vec![0f32; ex.w3.out]).collect();
    let mut jobs = Vec::with_capacity(2 * exs.len());
    for ((ex, _), (g, u)) in exs.iter().zip(gs.iter_mut().zip(us.iter_mut())) {
        jobs.push((&ex.w1, 0, &xin[..], &mut g[..]));
        jobs.push((&ex.w3, 0, &xin[..], &mut u[..]));
    }
    forward_one_many(jobs);
    // With activation quantization the routing weight scales the SwiGLU output before `w2`.
    for ((ex, wt), (g, u)) in exs.iter().zip(gs.iter_mut().zip(&us)) {
        let inside = wt.as_ref().filter(|_| aq).map(std::slice::from_ref);
        activate(g, u, ex.w1.out, c.swiglu_limit, inside);
    }
    let hs: Vec<_> = exs
        .iter()
        .zip(&gs)
        .map(|((ex, _), g)| gemm_input(g, ex.w1.out, aq))
        .collect();
    let mut outs: Vec<Vec<f32>> = exs.iter().map(|_| vec![0f32; d]).collect();
    let jobs = exs
        .iter()
        .zip(&hs)
        .zip(outs.iter_mut())
        .map(|(((ex, _), h), y)| (&ex.w2, 0, &h[..], &mut y[..]))
        .collect();
    forward_one_many(jobs);
    let mut y = vec![0f32; d];
    for ((_, wt), out) in exs.iter().zip(&outs) {
        match wt {
            None => y.copy_from_slice(out),
            Some(wt) => {
                let scale = if aq { 1.0 } else { *wt };
                crate::cpu::kernels::axpy(scale, out, &mut y);
            }
        }
    }
    y
}

/// The MoE block for `l` tokens (`x` normed `[l, D]`, `ids` their token ids).
pub fn forward(
    c: &ModelConfig,
    w: &MoeWeights,
    x: &[f32],
    ids: &[u32],
    l: usize,
    nm: Numerics,
) -> Vec<f32> {
    let aq = nm.act_quant();
    let d = c.hidden_size;
    let routes = route(c, w, x, ids, l);
    if l == 1 {
        return experts_one_token(c, w, x, &routes[0], aq);
    }
    let mut y = match &w.shared {
        Some(sh) => expert_forward(sh, x, l, c.swiglu_limit, None, aq),
        None => vec![0f32; l * d],
    };
    // Group tokens by expert so each expert's weights are read once per call.
    let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); c.n_routed_experts];
    for (t, r) in routes.iter().enumerate() {
        for &(e, wt) in r {
            by_expert[e].push((t, wt));
        }
    }
    for (e, toks) in by_expert.iter().enumerate() {
        if toks.is_empty() {
            continue;
        }
        let xin: Vec<f32> = toks
            .iter()
            .flat_map(|&(t, _)| x[t * d..(t + 1) * d].iter().copied())
            .collect();
        // With activation quantization the routing weight scales the SwiGLU output before
        // `w2` (the official order); otherwise it scales the expert output (transformers').
        let weights: Vec<f32> = toks.iter().map(|&(_, wt)| wt).collect();
        let inside = aq.then_some(&weights[..]);
        let out = expert_forward(&w.experts[e], &xin, toks.len(), c.swiglu_limit, inside, aq);
        for (j, &(t, wt)) in toks.iter().enumerate() {
            let scale = if aq { 1.0 } else { wt };
            crate::cpu::kernels::axpy(scale, &out[j * d..(j + 1) * d], &mut y[t * d..(t + 1) * d]);
        }
    }
    y
}
