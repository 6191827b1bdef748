//! Generating text for one sequence: a [`Session`] owns the sequence's cache and the tokens in
//! it, reuses it when the next prompt extends those tokens (chat turns), and runs the
//! prefill → sample → decode loop with streaming, UTF-8-safe text and stop conditions.
//! Only the last position's logits are computed.

use crate::engine::{Engine, EngineState};
use crate::error::{Error, Result};
use crate::model::Logits;
use crate::sampling::{Sampled, Sampler, SamplingParams, StopCheck, StopStrings};
use crate::tokenizer::{StreamDecoder, Tokenizer};
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
        let mut cont = Continuation::new(prompt, max_ctx, tok, opts)?;

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
        loop {
            if let Some(&last) = out.token_ids.last() {
                self.step(last)?;
            }
            let mut logits = self.last_logits.clone().expect("prefilled");
            let step = cont.push_logits(&mut logits)?;
            out.token_ids.push(step.sampled.token);
            if opts.sampling.logprobs.is_some() {
                out.logprobs.push(step.sampled);
            }
            if !step.text.is_empty() {
                out.text.push_str(&step.text);
                on_text(&step.text);
            }
            if let Some(f) = step.finish {
                out.finish_reason = f;
                out.stop_token = step.stop_token;
                break;
            }
        }
        out.decode_s = t.elapsed().as_secs_f64();
        Ok(out)
    }
}

/// The generation side of one sequence, independent of how its forwards are run (a
/// [`Session`] or a batching scheduler): samples each next token from logits and turns the
/// tokens into streamed text, applying stop tokens, stop strings and the length limits.
pub struct Continuation {
    sampler: Sampler,
    stops: StopStrings,
    detok: StreamDecoder,
    stop_ids: Vec<u32>,
    max_tokens: usize,
    /// Tokens the sequence may hold in all (the model's context).
    max_len: usize,
    prompt_len: usize,
    generated: Vec<u32>,
    done: bool,
}

/// What one [`Continuation::push_logits`] produced.
#[derive(Clone, Debug)]
pub struct ContinuationStep {
    /// The sampled token (with its log-probabilities when requested).
    pub sampled: Sampled,
    /// Text that became final with this token (possibly empty).
    pub text: String,
    /// Set when this token ended the generation.
    pub finish: Option<FinishReason>,
    /// The stop token that ended it, if any.
    pub stop_token: Option<u32>,
}

impl Continuation {
    /// Checks the prompt against the context `max_len` and the options, and prepares the
    /// sampler (whose penalties may cover the prompt).
    pub fn new(
        prompt: &[u32],
        max_len: usize,
        tok: &Tokenizer,
        opts: &GenerateOptions,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(Error::Input("the prompt is empty".into()));
        }
        if prompt.len() >= max_len {
            return Err(Error::Input(format!(
                "the prompt has {} tokens; the model's context is {max_len}",
                prompt.len()
            )));
        }
        let mut sampler = Sampler::new(opts.sampling.clone())?;
        sampler.set_prompt(prompt);
        Ok(Continuation {
            sampler,
            stops: StopStrings::new(opts.stop_strings.iter().cloned())?,
            detok: tok.stream_decoder(),
            stop_ids: opts.stop_ids.clone(),
            max_tokens: opts.max_tokens,
            max_len,
            prompt_len: prompt.len(),
            generated: Vec::new(),
            done: false,
        })
    }

    /// Tokens generated so far (a final stop token included).
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// True once a step has returned a finish reason.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Samples the next token from the logits after the last token, and returns it with the
    /// text it completes and whether the generation ends here. Penalties change `logits`.
    pub fn push_logits(&mut self, logits: &mut [f32]) -> Result<ContinuationStep> {
        if self.done {
            return Err(Error::Input("the generation has already finished".into()));
        }
        let sampled = self.sampler.sample(logits, &self.generated)?;
        let id = sampled.token;
        self.generated.push(id);
        let mut step = ContinuationStep {
            sampled,
            text: String::new(),
            finish: None,
            stop_token: None,
        };
        if self.stop_ids.contains(&id) {
            step.finish = Some(FinishReason::Stop);
            step.stop_token = Some(id);
            self.done = true;
            return Ok(step);
        }
        let piece = self.detok.push(id)?;
        match self.stops.push(&piece) {
            StopCheck::Continue { emit } => step.text = emit,
            StopCheck::Stopped { emit, .. } => {
                step.text = emit;
                step.finish = Some(FinishReason::Stop);
                self.done = true;
                return Ok(step);
            }
        }
        let full = self.prompt_len + self.generated.len() >= self.max_len;
        if self.generated.len() >= self.max_tokens || full {
            // Flush what the detokenizer and the stop-string watch held back.
            let rest = self.detok.finish();
            match self.stops.push(&rest) {
                StopCheck::Continue { emit } => {
                    step.text += &emit;
                    step.text += &self.stops.finish();
                    step.finish = Some(FinishReason::Length);
                }
                StopCheck::Stopped { emit, .. } => {
                    step.text += &emit;
                    step.finish = Some(FinishReason::Stop);
                }
            }
            self.done = true;
        }
        Ok(step)
    }
}
