//! Generating text for one sequence: a [`Session`] owns the sequence's cache and the tokens in
//! it, reuses it when the next prompt extends those tokens (chat turns), and runs the
//! prefill → sample → decode loop with streaming, UTF-8-safe text and stop conditions.
//! Only the last position's logits are computed.

use crate::engine::{Engine, EngineState};
use crate::error::{Error, Result};
use crate::model::Logits;
use crate::sampling::{Sampled, Sampler, SamplingParams, StopCheck, StopStrings};
use crate::tokenizer::Tokenizer;
use std::time::Instant;

/// What ends a generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the model's context was reached.
    Length,
}

impl FinishReason {
    /// OpenAI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Options of one generation.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end the generation (not part of the text).
    pub stop_ids: Vec<u32>,
    /// Strings that end the generation (not part of the text).
    pub stop_strings: Vec<String>,
}

/// The result of one generation.
#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated ids, including a final stop token if one ended the generation.
    pub token_ids: Vec<u32>,
    /// Generated text, without stop tokens or stop strings.
    pub text: String,
    pub finish_reason: FinishReason,
    /// The stop token that ended it, if any.
    pub stop_token: Option<u32>,
    /// Prompt tokens actually run through the model (the rest came from the cache).
    pub prefilled_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Per generated token, when logprobs were requested.
    pub logprobs: Vec<Sampled>,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prefilled_tokens, self.prefill_s)
    }
    /// Decode speed: tokens after the first (the first comes from the prefill's logits).
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.token_ids.len().saturating_sub(1), self.decode_s)
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// One sequence's cache plus the tokens it holds.
pub struct Session<'m> {
    model: &'m dyn Engine,
    cache: EngineState,
    tokens: Vec<u32>,
    /// Logits after the last token in the cache.
    last_logits: Option<Vec<f32>>,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m dyn Engine) -> Result<Self> {
        Ok(Session {
            model,
            cache: model.new_state()?,
            tokens: Vec::new(),
            last_logits: None,
        })
    }

    /// Tokens currently in the cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forgets the sequence.
    pub fn reset(&mut self) -> Result<()> {
        self.cache = self.model.new_state()?;
        self.tokens.clear();
        self.last_logits = None;
        Ok(())
    }

    /// Brings the cache to exactly `prompt`, feeding only what is new when the cached tokens are
    /// a prefix of it. Returns the number of tokens run through the model.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<usize> {
        if prompt.is_empty() {
            return Err(Error::Input("the prompt is empty".into()));
        }
        let reusable = prompt.len() >= self.tokens.len()
            && prompt.starts_with(&self.tokens)
            && self.last_logits.is_some();
        if !reusable {
            self.reset()?;
        }
        let new = &prompt[self.tokens.len()..];
        if new.is_empty() {
            return Ok(0);
        }
        let logits = self.model.forward(&mut self.cache, new, Logits::Last)?;
        self.tokens.extend_from_slice(new);
        self.last_logits = Some(logits);
        Ok(new.len())
    }

    /// Feeds one generated token.
    fn step(&mut self, id: u32) -> Result<()> {
        let logits = self.model.forward(&mut self.cache, &[id], Logits::Last)?;
        self.tokens.push(id);
        self.last_logits = Some(logits);
        Ok(())
    }

    /// Generates a continuation of `prompt`, calling `on_text` with each piece of text as soon
    /// as it is complete (never a broken UTF-8 character, never part of a stop string).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        tok: &Tokenizer,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let max_ctx = self.model.config().max_position_embeddings;
        if prompt.len() >= max_ctx {
            return Err(Error::Input(format!(
                "the prompt has {} tokens; the model's context is {max_ctx}",
                prompt.len()
            )));
        }
        let mut sampler = Sampler::new(opts.sampling.clone())?;
        let mut stops = StopStrings::new(opts.stop_strings.iter().cloned())?;
        sampler.set_prompt(prompt);

        let t = Instant::now();
        let prefilled = self.prefill(prompt)?;
        let prefill_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let mut out = Generation {
            token_ids: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Length,
            stop_token: None,
            prefilled_tokens: prefilled,
            prefill_s,
            decode_s: 0.0,
            logprobs: Vec::new(),
        };
        let mut detok = tok.stream_decoder();
        let mut emit = |s: &str, out: &mut Generation| {
            if !s.is_empty() {
                out.text.push_str(s);
                on_text(s);
            }
        };
        let mut stopped = false;
        while out.token_ids.len() < opts.max_tokens && self.tokens.len() < max_ctx {
            if !out.token_ids.is_empty() {
                let last = *out.token_ids.last().expect("non-empty");
                self.step(last)?;
            }
            let mut logits = self.last_logits.clone().expect("prefilled");
            let s = sampler.sample(&mut logits, &out.token_ids)?;
            let id = s.token;
            out.token_ids.push(id);
            if opts.sampling.logprobs.is_some() {
                out.logprobs.push(s);
            }
            if opts.stop_ids.contains(&id) {
                out.finish_reason = FinishReason::Stop;
                out.stop_token = Some(id);
                stopped = true;
                break;
            }
            let piece = detok.push(id)?;
            match stops.push(&piece) {
                StopCheck::Continue { emit: e } => emit(&e, &mut out),
                StopCheck::Stopped { emit: e, .. } => {
                    emit(&e, &mut out);
                    out.finish_reason = FinishReason::Stop;
                    stopped = true;
                    break;
                }
            }
        }
        if !stopped {
            let rest = detok.finish();
            let rest = match stops.push(&rest) {
                StopCheck::Continue { emit } => emit + &stops.finish(),
                StopCheck::Stopped { emit, .. } => {
                    out.finish_reason = FinishReason::Stop;
                    emit
                }
            };
            emit(&rest, &mut out);
        }
        out.decode_s = t.elapsed().as_secs_f64();
        Ok(out)
    }
}
