//! `Model::forward_batch`: a ragged batch of different sequences, each fed in its own chunks,
//! gives every sequence exactly (bitwise, in batch-invariant mode) the logits it gets alone.

use dsv4_core::numerics::Numerics;
use dsv4_core::{synthetic, Logits, Model, ModelConfig, SeqInput};
use serde_json::json;

fn small_model(numerics: Numerics) -> Model {
    let mut j = synthetic::flash_config_json();
    let over = json!({"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "head_dim": 32, "qk_rope_head_dim": 8, "q_lora_rank": 32,
        "o_groups": 2, "o_lora_rank": 16, "sliding_window": 8, "compress_ratios": [0, 4, 8, 4, 0],
        "num_hash_layers": 1, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 3,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32});
    for (k, v) in over.as_object().expect("object") {
        j[k] = v.clone();
    }
    let cfg = ModelConfig::from_json(&j).expect("valid config");
    let ck = synthetic::checkpoint(cfg, 11).expect("checkpoint");
    let mut model = Model::load(&ck).expect("model");
    model.numerics = numerics;
    model.batch_invariant = true;
    model
}

/// Sequence `s`'s ids and the chunk sizes it is fed in (differing per sequence, with
/// single-token "decode" steps mixed in).
fn plan(s: usize) -> (Vec<u32>, Vec<usize>) {
    let chunks: Vec<usize> = match s {
        0 => vec![13, 1, 1, 7, 1, 1, 1, 20],
        1 => vec![1, 1, 1, 1, 30, 1, 2, 1],
        2 => vec![5, 5, 5, 5, 5, 5, 5, 5],
        _ => vec![40, 1, 1],
    };
    let n: usize = chunks.iter().sum();
    let ids = (0..n)
        .map(|i| ((i * (31 + 6 * s) + 17 * s) % 300) as u32)
        .collect();
    (ids, chunks)
}

fn solo(model: &Model, ids: &[u32], chunks: &[usize]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut at = 0;
    chunks
        .iter()
        .map(|&c| {
            let out = model
                .forward(&mut cache, &ids[at..at + c], Logits::All)
                .expect("forward");
            at += c;
            out
        })
        .collect()
}

fn check(numerics: Numerics) {
    let model = small_model(numerics);
    let plans: Vec<_> = (0..4).map(plan).collect();
    let want: Vec<_> = plans
        .iter()
        .map(|(ids, ch)| solo(&model, ids, ch))
        .collect();

    let mut caches: Vec<_> = plans.iter().map(|_| model.new_cache()).collect();
    let mut at = vec![0usize; plans.len()];
    // Step k feeds chunk k of every sequence that still has one; sequence 3 joins late and
    // sequence 1 leaves early, so batch sizes and compositions vary.
    for step in 0..10usize {
        let mut active = Vec::new();
        let mut inputs = Vec::new();
        for (s, (cache, (ids, chunks))) in caches.iter_mut().zip(&plans).enumerate() {
            let k = if s == 3 {
                step.checked_sub(2)
            } else {
                Some(step)
            };
            let Some(k) = k.filter(|&k| k < chunks.len()) else {
                continue;
            };
            let c = chunks[k];
            inputs.push(SeqInput {
                cache,
                ids: &ids[at[s]..at[s] + c],
                want: Logits::All,
            });
            active.push((s, k));
            at[s] += c;
        }
        if inputs.is_empty() {
            continue;
        }
        let got = model.forward_batch(&mut inputs).expect("forward_batch");
        for ((s, k), g) in active.into_iter().zip(got) {
            assert!(
                g == want[s][k],
                "{numerics:?}: sequence {s} chunk {k} differs from its solo logits"
            );
        }
    }
    for (s, (ids, _)) in plans.iter().enumerate() {
        assert_eq!(at[s], ids.len(), "sequence {s} fully fed");
    }
}

#[test]
fn batched_sequences_get_their_solo_logits_bitwise() {
    check(Numerics::Reference);
}

#[test]
fn batched_sequences_get_their_solo_logits_bitwise_official() {
    check(Numerics::Official { act_quant: true });
}

/// `Logits::Last` and `Logits::None` select rows per sequence.
#[test]
fn logits_selection_per_sequence() {
    let model = small_model(Numerics::Reference);
    let vocab = model.config.vocab_size;
    let (a, b) = ([3u32, 4, 5], [7u32, 8]);
    let (mut ca, mut cb) = (model.new_cache(), model.new_cache());
    let out = model
        .forward_batch(&mut [
            SeqInput {
                cache: &mut ca,
                ids: &a,
                want: Logits::Last,
            },
            SeqInput {
                cache: &mut cb,
                ids: &b,
                want: Logits::None,
            },
        ])
        .expect("forward_batch");
    assert_eq!(out[0].len(), vocab);
    assert!(out[1].is_empty());
    assert_eq!((ca.pos, cb.pos), (3, 2));
    let all = solo(&model, &a, &[3]);
    assert!(out[0] == all[0][2 * vocab..]);
}

/// In batch-invariant mode how a sequence is chunked does not change its logits either (each
/// token's arithmetic is independent of the call it is in), so a scheduler may split prefills
/// anywhere and resume from cached prefixes without changing any output.
#[test]
fn chunking_does_not_change_logits_bitwise() {
    for numerics in [Numerics::Reference, Numerics::Official { act_quant: true }] {
        let model = small_model(numerics);
        let (ids, _) = plan(0);
        let whole: Vec<f32> = solo(&model, &ids, &[ids.len()]).concat();
        for chunks in [
            vec![1; ids.len()],
            vec![13, 1, 1, 7, 1, 1, 1, 20],
            vec![16, 16, 13],
        ] {
            let got: Vec<f32> = solo(&model, &ids, &chunks).concat();
            assert!(
                got == whole,
                "{numerics:?}: chunks {chunks:?} change the logits"
            );
        }
    }
}

/// One token's experts run as two parallel regions (gate and up of all of them, then every
/// down projection: `moe::forward` with one token) and give exactly what the general path
/// gives each copy of that token in a call of two (each picked expert's rows applied to both),
/// in both numerics profiles, on a hash-routed layer and on a biased top-k one.
#[test]
fn one_token_experts_match_the_general_path_bitwise() {
    use dsv4_core::model::moe;
    for numerics in [Numerics::Reference, Numerics::Official { act_quant: true }] {
        let mut model = small_model(numerics);
        model.batch_invariant = false;
        let c = &model.config;
        let d = c.hidden_size;
        for (li, layer) in model.weights.layers.iter().enumerate() {
            for tok in [3u32, 77, 190] {
                let x: Vec<f32> = (0..d)
                    .map(|i| ((i as f32 * 0.37 + tok as f32).sin()) * 0.8)
                    .collect();
                let one = moe::forward(c, &layer.moe, &x, &[tok], 1, numerics);
                let two = moe::forward(c, &layer.moe, &x.repeat(2), &[tok, tok], 2, numerics);
                assert!(
                    one[..] == two[..d] && one[..] == two[d..],
                    "{numerics:?} layer {li} token {tok}: one token's experts differ"
                );
            }
        }
    }
}
