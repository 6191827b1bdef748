//! Next-token sampling with OpenAI/vLLM semantics, and stop-string detection on streamed text.
//!
//! Order of operations in [`Sampler::sample`] (as vLLM's v1 sampler):
//! 1. log-probabilities of the **raw** logits (log-softmax before any processing; vLLM's default
//!    `raw_logprobs`), for [`Sampled::logprob`] and [`Sampled::top_logprobs`];
//! 2. repetition penalty over prompt ∪ generated tokens, then frequency and presence penalties
//!    over generated-token counts (in place on the logits);
//! 3. temperature 0 → greedy argmax (ties → lowest id); otherwise temperature, min-p (relative to
//!    the most likely token), top-k, top-p (nucleus), then a draw from the seeded RNG.

use std::collections::{HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{Error, Result};

/// Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`).
const GREEDY_TEMPERATURE: f32 = 1e-5;

/// Largest number of top log-probabilities per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Sampling knobs of one request. Neutral values disable a stage.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy. Default 1.0 (DeepSeek's recommendation).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; in (0, 1],
    /// 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one; in [0, 1], 0 = off.
    pub min_p: f32,
    /// Values above 1 discourage any token seen in the prompt or output (positive logits
    /// divided, negative multiplied); 1 = off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated; in [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of generated tokens; in [-2, 2].
    pub frequency_penalty: f32,
    /// RNG seed; `None` seeds from the OS. Same seed + same logits → same tokens.
    pub seed: Option<u64>,
    /// Return this many top log-probabilities per token (at most [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Deterministic argmax decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// True when sampling reduces to argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE || self.top_k == 1
    }

    /// Checks every value is finite and in range.
    pub fn validate(&self) -> Result<()> {
        let err = |msg: String| Err(Error::Sampling(msg));
        for (name, v) in [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("repetition_penalty", self.repetition_penalty),
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() {
                return err(format!("{name} must be a finite number, got {v}"));
            }
        }
        if self.temperature < 0.0 {
            return err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if self.repetition_penalty <= 0.0 {
            return err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if let Some(n) = self.logprobs {
            if n > MAX_TOP_LOGPROBS {
                return err(format!(
                    "logprobs must be at most {MAX_TOP_LOGPROBS}, got {n}"
                ));
            }
        }
        Ok(())
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// The chosen token and its log-probabilities (of the raw distribution, see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// log p(token) under the raw logits.
    pub logprob: f32,
    /// The `logprobs` most likely tokens under the raw logits, most likely first (ties → lower
    /// id); empty when not requested.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Samples tokens for one sequence; owns its RNG.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
    prompt_tokens: HashSet<u32>,
    counts: HashMap<u32, u32>,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// Validates `params` and seeds the RNG (from `params.seed`, else from the OS).
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed),
            None => ChaCha20Rng::try_from_os_rng()
                .map_err(|e| Error::Sampling(format!("cannot seed the RNG from the OS: {e}")))?,
        };
        Ok(Self {
            params,
            rng,
            prompt_tokens: HashSet::new(),
            counts: HashMap::new(),
            candidates: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Sets the prompt tokens, which the repetition penalty also covers (as in vLLM and HF).
    pub fn set_prompt(&mut self, prompt: &[u32]) {
        self.prompt_tokens.clear();
        if self.params.repetition_penalty != 1.0 {
            self.prompt_tokens.extend(prompt.iter().copied());
        }
    }

    /// Picks the next token from `logits` (one row, length = vocabulary); `history` is the tokens
    /// generated so far. Penalties are applied to `logits` in place.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> Result<Sampled> {
        let (lse, top_logprobs) = raw_log_softmax_stats(logits, self.params.logprobs)?;
        let saved = self.apply_penalties(logits, history);
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits)
        }
        .ok_or_else(|| {
            Error::Sampling("every token has probability zero after penalties".into())
        })?;
        let raw = saved
            .iter()
            .find(|(id, _)| *id == token)
            .map_or(logits[token as usize], |(_, raw)| *raw);
        Ok(Sampled {
            token,
            logprob: raw - lse,
            top_logprobs,
        })
    }

    /// Applies the penalties; returns the raw logits of the tokens it changed.
    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32]) -> Vec<(u32, f32)> {
        let p = &self.params;
        if !p.has_penalties() {
            return Vec::new();
        }
        let n = logits.len();
        self.counts.clear();
        for &t in history.iter().filter(|&&t| (t as usize) < n) {
            *self.counts.entry(t).or_insert(0) += 1;
        }
        let mut saved: Vec<(u32, f32)> = Vec::new();
        let mut touch = |id: u32, logits: &mut [f32]| {
            if !saved.iter().any(|(s, _)| *s == id) {
                saved.push((id, logits[id as usize]));
            }
        };
        if p.repetition_penalty != 1.0 {
            let rp = p.repetition_penalty;
            let in_history = self
                .counts
                .keys()
                .filter(|t| !self.prompt_tokens.contains(t));
            for &t in self.prompt_tokens.iter().chain(in_history) {
                if (t as usize) < n {
                    touch(t, logits);
                    let l = &mut logits[t as usize];
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                touch(t, logits);
                logits[t as usize] -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
        saved
    }

    /// Temperature, min-p, top-k, top-p, then a weighted draw.
    fn draw(&mut self, logits: &[f32]) -> Option<u32> {
        let p = &self.params;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return None;
        }
        let inv_t = 1.0 / p.temperature as f64;
        // Weight relative to the most likely token: p_i / p_max.
        let weight = |l: f32| ((l as f64 - max as f64) * inv_t).exp();
        let truncates = p.min_p > 0.0 || (p.top_k > 0 && p.top_k < logits.len()) || p.top_p < 1.0;

        if !truncates {
            let total: f64 = logits.iter().map(|&l| weight(l)).sum();
            let mut r = self.rng.random::<f64>() * total;
            let mut last = None;
            for (i, &l) in logits.iter().enumerate() {
                let w = weight(l);
                if w > 0.0 {
                    last = Some(i as u32);
                    if r < w {
                        return last;
                    }
                    r -= w;
                }
            }
            return last;
        }

        let cands = &mut self.candidates;
        cands.clear();
        let min_w = p.min_p as f64;
        cands.extend(
            logits
                .iter()
                .enumerate()
                .filter(|&(_, &l)| l > f32::NEG_INFINITY && weight(l) >= min_w)
                .map(|(i, &l)| (i as u32, l)),
        );
        // Most likely first; equal logits → lower id first.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, order);
            cands.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            cands.sort_unstable_by(order);
            let total: f64 = cands.iter().map(|&(_, l)| weight(l)).sum();
            let target = p.top_p as f64 * total;
            let mut cum = 0.0;
            let mut keep = cands.len();
            for (i, &(_, l)) in cands.iter().enumerate() {
                cum += weight(l);
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }
        let total: f64 = cands.iter().map(|&(_, l)| weight(l)).sum();
        let mut r = self.rng.random::<f64>() * total;
        for &(id, l) in cands.iter() {
            let w = weight(l);
            if r < w {
                return Some(id);
            }
            r -= w;
        }
        cands.last().map(|&(id, _)| id)
    }
}

/// Log-sum-exp of the raw logits and the `top_n` largest log-probabilities. Errors on an empty
/// row, a NaN, or a row with no finite logit.
fn raw_log_softmax_stats(logits: &[f32], top_n: Option<usize>) -> Result<(f32, Vec<(u32, f32)>)> {
    if logits.is_empty() {
        return Err(Error::Sampling("empty logits".into()));
    }
    let mut max = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            return Err(Error::Sampling(format!("logit of token {i} is NaN")));
        }
        max = max.max(l);
    }
    if !max.is_finite() {
        return Err(Error::Sampling(format!("no finite logit (max is {max})")));
    }
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;

    let n = top_n.unwrap_or(0).min(logits.len());
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if top.len() == n && top.last().is_some_and(|&(_, worst)| l <= worst) {
                continue;
            }
            // Insert after every entry >= l, so equal logits keep ascending ids.
            let pos = top.partition_point(|&(_, v)| v >= l);
            top.insert(pos, (i as u32, l));
            top.truncate(n);
        }
    }
    Ok((lse, top.into_iter().map(|(i, l)| (i, l - lse)).collect()))
}

/// Index of the largest finite logit; ties → lowest id. `None` if all are -inf.
fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l > f32::NEG_INFINITY && best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32)
}

/// Watches streamed text for stop strings.
///
/// Text that could be the beginning of a stop string is held back until it is decided, so the
/// caller never shows text that later turns out to belong to a stop string. The stop string
/// itself and anything after it are not emitted (OpenAI semantics).
#[derive(Debug, Clone)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
}

/// What [`StopStrings::push`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCheck {
    /// No stop yet; `emit` is safe to show.
    Continue { emit: String },
    /// Stop string number `stop` occurred; show `emit`, then end the generation.
    Stopped { emit: String, stop: usize },
}

impl StopStrings {
    /// Watches for `stops`. Empty stop strings are an error.
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Result<Self> {
        let stops: Vec<String> = stops.into_iter().map(Into::into).collect();
        if stops.iter().any(String::is_empty) {
            return Err(Error::Sampling("empty stop string".into()));
        }
        Ok(Self {
            stops,
            held: String::new(),
        })
    }

    /// True when no stop strings are watched.
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Adds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopCheck {
        self.held.push_str(text);
        // Earliest match; at equal positions the first listed stop string wins.
        let mut found: Option<(usize, usize)> = None;
        for (k, s) in self.stops.iter().enumerate() {
            if let Some(pos) = self.held.find(s.as_str()) {
                if found.is_none_or(|(p, _)| pos < p) {
                    found = Some((pos, k));
                }
            }
        }
        if let Some((pos, stop)) = found {
            let emit = self.held[..pos].to_owned();
            self.held.clear();
            return StopCheck::Stopped { emit, stop };
        }
        let keep_from = self.partial_match_start();
        let emit = self.held[..keep_from].to_owned();
        self.held.drain(..keep_from);
        StopCheck::Continue { emit }
    }

    /// Releases the held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Start of the longest suffix of the held text that is a proper prefix of a stop string
    /// (`held.len()` if none).
    fn partial_match_start(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let lower = self.held.len().saturating_sub(longest.saturating_sub(1));
        (lower..self.held.len())
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| {
                let suffix = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(suffix))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(p: SamplingParams) -> Sampler {
        Sampler::new(p).unwrap()
    }

    fn seeded(seed: u64) -> SamplingParams {
        SamplingParams {
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    fn logits() -> Vec<f32> {
        vec![0.5, 2.0, -1.0, 3.0, 3.0, 1.0, f32::NEG_INFINITY, 2.9]
    }

    fn softmax(l: &[f32], t: f32) -> Vec<f64> {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = l.iter().map(|&x| (((x - m) / t) as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    #[test]
    fn greedy_picks_argmax_lowest_id_on_ties() {
        let mut s = sampler(SamplingParams::greedy());
        let got = s.sample(&mut logits(), &[]).unwrap();
        assert_eq!(got.token, 3);
        let p = softmax(&logits(), 1.0);
        assert!((got.logprob as f64 - p[3].ln()).abs() < 1e-5);
        assert!(got.top_logprobs.is_empty());
    }

    #[test]
    fn top_logprobs_are_raw_and_ordered() {
        let mut s = sampler(SamplingParams {
            logprobs: Some(3),
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        // The penalty (on token 3, 4) changes the pick but not the reported raw logprobs.
        let got = s.sample(&mut logits(), &[3, 4]).unwrap();
        let p = softmax(&logits(), 1.0);
        assert_eq!(got.token, 7);
        assert!((got.logprob as f64 - p[7].ln()).abs() < 1e-5);
        let ids: Vec<u32> = got.top_logprobs.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![3, 4, 7]);
        for (id, lp) in got.top_logprobs {
            assert!((lp as f64 - p[id as usize].ln()).abs() < 1e-5);
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let run = |seed| {
            let mut s = sampler(SamplingParams {
                temperature: 1.3,
                top_p: 0.95,
                ..seeded(seed)
            });
            (0..200)
                .map(|_| s.sample(&mut logits(), &[]).unwrap().token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_equal_greedy() {
        for p in [
            SamplingParams {
                top_k: 1,
                ..seeded(1)
            },
            SamplingParams {
                top_p: 1e-6,
                ..seeded(1)
            },
        ] {
            let mut s = sampler(p);
            for _ in 0..50 {
                assert_eq!(s.sample(&mut logits(), &[]).unwrap().token, 3);
            }
        }
    }

    #[test]
    fn penalties_change_the_choice() {
        let base = vec![1.0, 0.9, -0.5, -0.45];
        let greedy = |p: SamplingParams, l: &[f32], h: &[u32]| {
            let mut s = sampler(p);
            s.sample(&mut l.to_vec(), h).unwrap().token
        };
        assert_eq!(greedy(SamplingParams::greedy(), &base, &[0]), 0);
        // Repetition: 1.0 / 1.2 < 0.9.
        let rep = SamplingParams {
            repetition_penalty: 1.2,
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy(rep.clone(), &base, &[0]), 1);
        // A negative logit is multiplied: -0.45 * 1.2 = -0.54 < -0.5.
        assert_eq!(greedy(rep.clone(), &[-0.5, -0.45], &[1]), 0);
        // The prompt counts for the repetition penalty too.
        let mut s = sampler(rep);
        s.set_prompt(&[0]);
        assert_eq!(s.sample(&mut base.clone(), &[]).unwrap().token, 1);
        // Presence: once per seen token.
        let pres = SamplingParams {
            presence_penalty: 0.2,
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy(pres, &base, &[0]), 1);
        // Frequency: scales with the count (0.05 × 3 > 0.1, 0.05 × 1 < 0.1).
        let freq = SamplingParams {
            frequency_penalty: 0.05,
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy(freq.clone(), &base, &[0]), 0);
        assert_eq!(greedy(freq, &base, &[0, 0, 0]), 1);
    }

    #[test]
    fn temperature_sampling_matches_softmax() {
        let l = logits();
        for (t, extra) in [(1.0, None), (0.7, None), (1.5, Some(0.3f32))] {
            let mut s = sampler(SamplingParams {
                temperature: t,
                min_p: extra.unwrap_or(0.0),
                ..seeded(42)
            });
            let n = 200_000;
            let mut counts = vec![0usize; l.len()];
            for _ in 0..n {
                counts[s.sample(&mut l.clone(), &[]).unwrap().token as usize] += 1;
            }
            let mut want = softmax(&l, t);
            if let Some(min_p) = extra {
                // min-p drops tokens below min_p × the top probability, then renormalizes.
                let top = want.iter().copied().fold(0.0, f64::max);
                want.iter_mut()
                    .for_each(|p| *p = if *p >= min_p as f64 * top { *p } else { 0.0 });
                let s: f64 = want.iter().sum();
                want.iter_mut().for_each(|p| *p /= s);
            }
            for (i, &c) in counts.iter().enumerate() {
                let freq = c as f64 / n as f64;
                assert!(
                    (freq - want[i]).abs() < 0.005,
                    "t={t} token {i}: {freq} vs {}",
                    want[i]
                );
            }
            assert_eq!(counts[6], 0, "-inf logit was sampled");
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_support() {
        let l = logits();
        let mut s = sampler(SamplingParams {
            top_k: 3,
            temperature: 5.0,
            ..seeded(3)
        });
        for _ in 0..2000 {
            assert!([3, 4, 7].contains(&s.sample(&mut l.clone(), &[]).unwrap().token));
        }
        // p(3) = p(4) ≈ 0.29, p(7) ≈ 0.26: top_p 0.5 keeps tokens 3 and 4 only.
        let mut s = sampler(SamplingParams {
            top_p: 0.5,
            ..seeded(3)
        });
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            seen.insert(s.sample(&mut l.clone(), &[]).unwrap().token);
        }
        assert_eq!(seen, HashSet::from([3, 4]));
    }

    #[test]
    fn validation_and_bad_logits() {
        let bad = [
            SamplingParams {
                temperature: -0.1,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                min_p: -0.5,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..Default::default()
            },
            SamplingParams {
                logprobs: Some(21),
                ..Default::default()
            },
        ];
        for p in bad {
            assert!(matches!(p.validate(), Err(Error::Sampling(_))), "{p:?}");
            assert!(Sampler::new(p).is_err());
        }
        SamplingParams::default().validate().unwrap();
        let mut s = sampler(seeded(0));
        assert!(s.sample(&mut [], &[]).is_err());
        assert!(s.sample(&mut [0.0, f32::NAN], &[]).is_err());
        assert!(s.sample(&mut [f32::NEG_INFINITY; 3], &[]).is_err());
        // Out-of-range history ids are ignored, not a panic.
        let mut s = sampler(SamplingParams {
            frequency_penalty: 1.0,
            ..seeded(0)
        });
        assert!(s.sample(&mut [0.0, 1.0], &[5, u32::MAX]).is_ok());
    }

    #[test]
    fn stop_strings_hold_back_partial_matches() {
        let mut st = StopStrings::new(["</answer>", "STOP"]).unwrap();
        let cont = |s: &str| StopCheck::Continue { emit: s.into() };
        assert_eq!(st.push("Hello </an"), cont("Hello "));
        assert_eq!(st.push("swer? no"), cont("</answer? no"));
        assert_eq!(st.push(" ST"), cont(" "));
        assert_eq!(st.push("ILL"), cont("STILL"));
        assert_eq!(st.push("x ST"), cont("x "));
        assert_eq!(
            st.push("OP and more"),
            StopCheck::Stopped {
                emit: String::new(),
                stop: 1
            }
        );
        // The earliest occurrence wins; text after it is dropped.
        let mut st = StopStrings::new(["b", "abc"]).unwrap();
        assert_eq!(
            st.push("xxabcd"),
            StopCheck::Stopped {
                emit: "xx".into(),
                stop: 1
            }
        );
        // Multi-byte text and held text released by finish().
        let mut st = StopStrings::new(["深度求索"]).unwrap();
        assert_eq!(st.push("你好深度"), cont("你好"));
        assert_eq!(st.finish(), "深度");
        assert!(StopStrings::new([""]).is_err());
        assert!(StopStrings::new(Vec::<String>::new()).unwrap().is_empty());
    }
}
