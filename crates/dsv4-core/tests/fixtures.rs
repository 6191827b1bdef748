//! The engine against transformers 5.23 reference logits (tests/fixtures, built by
//! tools/make_fixtures.py): one call, the reference's odd chunking, prefill + token-by-token
//! decode, and other chunkings — for the official FP8/FP4 layout and the transformers bf16 layout.

mod common;

use common::{fixture_dir, row_errors, run_chunks, Reference};
use dsv4_core::{Checkpoint, Logits, Model};

fn load_model(name: &str) -> Model {
    let ck = Checkpoint::open(&fixture_dir(name)).expect("open fixture");
    Model::load(&ck).expect("load fixture")
}

/// Row-wise relative error ≤ 1e-4 on the covered columns and the same full-vocab argmax.
fn compare(what: &str, got: &[f32], want: &[f32], cols: &[usize], argmax: &[i64], vocab: usize) {
    let t = argmax.len();
    assert_eq!(got.len(), t * vocab, "{what}: logits size");
    let mut worst = 0f32;
    for r in 0..t {
        let g = &got[r * vocab..(r + 1) * vocab];
        let w = &want[r * cols.len()..(r + 1) * cols.len()];
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let err = cols
            .iter()
            .zip(w)
            .fold(0f32, |m, (&c, &x)| m.max((g[c] - x).abs()))
            / scale;
        worst = worst.max(err);
        assert!(err <= 1e-4, "{what}: row {r} relative error {err:.3e}");
        let am = g
            .iter()
            .enumerate()
            .fold(0, |b, (i, &x)| if x > g[b] { i } else { b });
        assert_eq!(am as i64, argmax[r], "{what}: row {r} argmax");
    }
    eprintln!("{what}: worst row relative error {worst:.2e}");
}

fn check_fixture(name: &str) {
    let model = load_model(name);
    let r = Reference::load(name);
    let vocab = model.config.vocab_size;
    let ids = r.ids("ids");
    let argmax = r.ints("argmax");
    let (want, cols) = r.logits("logits", vocab);
    let t = ids.len();

    compare(
        &format!("{name} one call"),
        &run_chunks(&model, &ids, &[t]),
        &want,
        &cols,
        &argmax,
        vocab,
    );

    let chunks: Vec<usize> = r.ints("chunks").into_iter().map(|x| x as usize).collect();
    let (want_c, _) = r.logits("logits_chunked", vocab);
    let got = run_chunks(&model, &ids, &chunks);
    compare(
        &format!("{name} chunks {chunks:?}"),
        &got,
        &want_c,
        &cols,
        &argmax,
        vocab,
    );
    compare(
        &format!("{name} chunks vs one-call ref"),
        &got,
        &want,
        &cols,
        &argmax,
        vocab,
    );

    let p = r.ints("decode_prefill")[0] as usize;
    let mut decode = vec![p];
    decode.extend(std::iter::repeat_n(1, t - p));
    let (want_d, _) = r.logits("logits_decode", vocab);
    compare(
        &format!("{name} decode"),
        &run_chunks(&model, &ids, &decode),
        &want_d,
        &cols,
        &argmax,
        vocab,
    );

    // Other chunkings: token by token from the start, and sizes straddling every boundary.
    let ones = vec![1; t];
    compare(
        &format!("{name} token by token"),
        &run_chunks(&model, &ids, &ones),
        &want,
        &cols,
        &argmax,
        vocab,
    );
    let mut odd = Vec::new();
    let (mut left, mut k) = (t, 0);
    while left > 0 {
        let c = [3, 17, 2, 33, 1, 9, 128, 5][k % 8].min(left);
        odd.push(c);
        left -= c;
        k += 1;
    }
    compare(
        &format!("{name} chunks {odd:?}"),
        &run_chunks(&model, &ids, &odd),
        &want,
        &cols,
        &argmax,
        vocab,
    );
}

#[test]
fn official_fp8_layout_matches_reference() {
    check_fixture("official-fp8");
}

#[test]
fn transformers_bf16_layout_matches_reference() {
    check_fixture("hf-bf16");
}

#[test]
fn real_vocabulary_matches_reference() {
    check_fixture("official-vocab");
}

/// Greedy continuation equals the reference's (argmax over the last row each step).
#[test]
fn greedy_continuations_match_reference() {
    for name in ["official-fp8", "hf-bf16", "official-vocab"] {
        let model = load_model(name);
        let r = Reference::load(name);
        let prompt = r.ids("greedy_prompt");
        let want = r.ids("greedy_ids");
        let mut cache = model.new_cache();
        let mut logits = model.forward(&mut cache, &prompt, Logits::Last).unwrap();
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let next = logits
                .iter()
                .enumerate()
                .fold(0, |b, (i, &x)| if x > logits[b] { i } else { b })
                as u32;
            got.push(next);
            logits = model.forward(&mut cache, &[next], Logits::Last).unwrap();
        }
        assert_eq!(got, want, "{name} greedy continuation");
    }
}

/// The official numerics profile is chunking-invariant too: its roundings are per row/entry.
/// Where the linear layers follow the blocked order (AVX-512: a token's sums do not depend on
/// how many tokens share the call) every chunking gives bitwise the same logits. Elsewhere these
/// fixtures, not built to keep values off FP8/FP4 rounding midpoints, may see float noise
/// between chunkings flip a rare rounding, which then shifts every later row: there most rows
/// must match to 1e-4 and none may drift far. (tests/fixtures-official checks the profile
/// strictly against its reference.)
#[test]
fn official_profile_agrees_across_chunkings() {
    for (name, aq) in [
        ("official-fp8", false),
        ("hf-bf16", false),
        ("official-fp8", true),
    ] {
        let mut model = load_model(name);
        model.numerics = dsv4_core::numerics::Numerics::Official { act_quant: aq };
        let r = Reference::load(name);
        let ids = r.ids("ids");
        let t = ids.len();
        let vocab = model.config.vocab_size;
        let one = run_chunks(&model, &ids, &[t]);
        // The profile really differs from the reference profile.
        let (reference, _) = r.logits("logits", vocab);
        let diff = one
            .iter()
            .zip(&reference)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff > 1e-3,
            "{name}: official profile identical to reference ({diff})"
        );
        let chunks: Vec<usize> = r.ints("chunks").into_iter().map(|x| x as usize).collect();
        for (what, sizes) in [("chunks", chunks), ("token by token", vec![1; t])] {
            let got = run_chunks(&model, &ids, &sizes);
            if dsv4_core::cpu::kernels::blocked_order() {
                let same = got
                    .iter()
                    .zip(&one)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{name} aq={aq} {what}: not bitwise equal");
            }
            let errs = row_errors(&got, &one, vocab);
            let close = errs.iter().filter(|&&e| e <= 1e-4).count();
            let worst = errs.iter().cloned().fold(0f32, f32::max);
            eprintln!(
                "{name} official aq={aq} {what}: {close}/{t} rows within 1e-4, worst {worst:.2e}"
            );
            if dsv4_core::cpu::kernels::blocked_order() {
                // Checked bitwise above.
            } else if aq {
                // Rounding every GEMM input amplifies summation-order noise: a smoke test.
                let mean = errs.iter().sum::<f32>() / t as f32;
                assert!(
                    close * 2 >= t && mean <= 5e-2,
                    "{name} aq {what}: {close}/{t} rows, mean {mean:.2e}"
                );
            } else {
                assert!(
                    close * 100 >= t * 90,
                    "{name} {what}: only {close}/{t} rows agree"
                );
                assert!(worst <= 2e-2, "{name} {what}: worst row {worst:.2e}");
            }
        }
    }
}
