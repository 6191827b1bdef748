//! The scheduler: one thread owns the model, every running sequence and the prefix cache, and
//! runs continuous batching. Each step feeds, in ONE batched forward, the pending token of every
//! decoding sequence plus prefill chunks of sequences still reading their prompt (under a token
//! budget, so long prompts are chunked and interleaved with decode steps). Sampled tokens go back
//! to each request through its own channel; a request whose receiver is gone (client
//! disconnected) is dropped and its memory freed at the next step.

use crate::backend::{Backend, BatchItem};
use crate::metrics::Metrics;
use crate::prefix_cache::PrefixCache;
use dsv4_core::generate::{Continuation, FinishReason, GenerateOptions};
use dsv4_core::sampling::Sampled;
use dsv4_core::tokenizer::Tokenizer;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;
use tokio::sync::mpsc;

/// Scheduler limits.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences decoded together at most; more wait in the queue.
    pub max_running: usize,
    /// Sequences waiting at most; beyond that requests are refused (HTTP 429).
    pub max_waiting: usize,
    /// Tokens per forward step (decode tokens first, then prefill chunks fill the rest).
    pub max_batch_tokens: usize,
    /// Prefix-cache snapshot spacing in tokens.
    pub prefix_block: usize,
    /// Prefix-cache capacity in bytes (0 disables it).
    pub prefix_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_running: 64,
            max_waiting: 256,
            max_batch_tokens: 512,
            prefix_block: 64,
            prefix_cache_bytes: 2 << 30,
        }
    }
}

/// One sequence to generate.
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub options: GenerateOptions,
    /// Added to the logits before sampling (OpenAI `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// Where the sequence's events go; dropping the receiver cancels the sequence.
    pub events: mpsc::UnboundedSender<Event>,
    pub arrived: Instant,
}

/// What a sequence reports back.
#[derive(Debug)]
pub enum Event {
    /// One generated token and the text it completed (possibly empty).
    Token {
        token: u32,
        text: String,
        logprobs: Option<Sampled>,
    },
    /// The last event of a successful sequence.
    Done(Usage),
    /// The last event of a failed sequence.
    Error(String),
}

/// Token counts and how the sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens taken from the prefix cache.
    pub cached_tokens: usize,
}

/// Why a request could not be queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the server is busy: {0} sequences are already waiting; retry later")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
}

/// The handlers' side of the engine: submit requests, read metrics.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std_mpsc::Sender<GenRequest>,
    pub metrics: Arc<Metrics>,
    max_waiting: usize,
}

impl EngineHandle {
    /// Queues `reqs` (the `n` choices of one request) all or none.
    pub fn submit(&self, reqs: Vec<GenRequest>) -> Result<(), SubmitError> {
        let n = reqs.len() as u64;
        let waiting = self.metrics.waiting.fetch_add(n, Relaxed);
        if waiting + n > self.max_waiting as u64 {
            self.metrics.waiting.fetch_sub(n, Relaxed);
            self.metrics.requests_rejected.fetch_add(1, Relaxed);
            return Err(SubmitError::QueueFull(waiting as usize));
        }
        for r in reqs {
            if self.tx.send(r).is_err() {
                return Err(SubmitError::Stopped);
            }
        }
        Ok(())
    }

    /// True while the engine thread runs.
    pub fn is_alive(&self) -> bool {
        !self.metrics.engine_stopped.load(Relaxed)
    }
}

/// Marks the engine stopped however its thread ends (a panic included), so `/health` and new
/// requests see it.
struct StopFlag(Arc<Metrics>);

impl Drop for StopFlag {
    fn drop(&mut self) {
        self.0.engine_stopped.store(true, Relaxed);
    }
}

/// A sequence being prefilled or decoded.
struct Seq<S> {
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens already in `state`.
    fed: usize,
    state: S,
    cont: Continuation,
    logit_bias: Vec<(u32, f32)>,
    want_logprobs: bool,
    events: mpsc::UnboundedSender<Event>,
    cached: usize,
    arrived: Instant,
    last_token: Option<Instant>,
    /// Tokens scheduled in the current step.
    scheduled: usize,
}

impl<S> Seq<S> {
    fn decoding(&self) -> bool {
        self.fed >= self.prompt_len
    }
}

/// Starts the engine thread; it runs until every handle is dropped.
pub fn start<B: Backend>(
    backend: B,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
) -> std::io::Result<EngineHandle> {
    let (tx, rx) = std_mpsc::channel();
    let metrics = Arc::new(Metrics::default());
    let handle = EngineHandle {
        tx,
        metrics: Arc::clone(&metrics),
        max_waiting: config.max_waiting,
    };
    let cache = PrefixCache::new(config.prefix_block, config.prefix_cache_bytes);
    let engine = Engine {
        backend,
        tokenizer,
        rx,
        waiting: VecDeque::new(),
        running: Vec::new(),
        cache,
        config,
        metrics,
    };
    std::thread::Builder::new()
        .name("dsv4-engine".into())
        .spawn(move || engine.run())?;
    Ok(handle)
}

struct Engine<B: Backend> {
    backend: B,
    tokenizer: Arc<Tokenizer>,
    rx: std_mpsc::Receiver<GenRequest>,
    waiting: VecDeque<GenRequest>,
    running: Vec<Seq<B::State>>,
    cache: PrefixCache<B::State>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
}

impl<B: Backend> Engine<B> {
    fn run(mut self) {
        let _flag = StopFlag(Arc::clone(&self.metrics));
        loop {
            if self.waiting.is_empty() && self.running.is_empty() {
                match self.rx.recv() {
                    Ok(r) => self.waiting.push_back(r),
                    Err(_) => break, // every handle is gone
                }
            }
            while let Ok(r) = self.rx.try_recv() {
                self.waiting.push_back(r);
            }
            self.drop_cancelled();
            self.admit();
            self.publish_gauges();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    fn publish_gauges(&self) {
        // `waiting` is counted by `submit` (before the engine sees a request) and decremented
        // here as requests leave the queue.
        self.metrics
            .running
            .store(self.running.len() as u64, Relaxed);
        *self
            .metrics
            .prefix
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = self.cache.stats();
    }

    /// Frees the sequences whose client went away.
    fn drop_cancelled(&mut self) {
        let (w0, r0) = (self.waiting.len(), self.running.len());
        self.waiting.retain(|r| !r.events.is_closed());
        self.running.retain(|s| !s.events.is_closed());
        self.metrics
            .waiting
            .fetch_sub((w0 - self.waiting.len()) as u64, Relaxed);
        let gone = w0 + r0 - self.waiting.len() - self.running.len();
        self.metrics
            .requests_cancelled
            .fetch_add(gone as u64, Relaxed);
    }

    /// Moves waiting requests into the running set, resuming each from the longest cached
    /// prefix of its prompt.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_running {
            let Some(r) = self.waiting.pop_front() else {
                break;
            };
            self.metrics.waiting.fetch_sub(1, Relaxed);
            let max_ctx = self.backend.max_context();
            let cont = match Continuation::new(&r.prompt, max_ctx, &self.tokenizer, &r.options) {
                Ok(c) => c,
                Err(e) => {
                    self.metrics.requests_failed.fetch_add(1, Relaxed);
                    let _ = r.events.send(Event::Error(e.to_string()));
                    continue;
                }
            };
            // At least the last prompt token is fed, for the logits of the first sample. A
            // snapshot that cannot be copied (device memory) is a miss.
            let hit = match self.cache.lookup(&r.prompt, r.prompt.len() - 1) {
                Some((len, s)) => match self.backend.copy_state(s) {
                    Ok(c) => Some((len, c)),
                    Err(_) => {
                        self.cache.hit_unusable(len);
                        None
                    }
                },
                None => None,
            };
            let (cached, state) = match hit {
                Some(hit) => hit,
                None => match self.backend.new_state() {
                    Ok(s) => (0, s),
                    Err(e) => {
                        self.metrics.requests_failed.fetch_add(1, Relaxed);
                        let _ = r.events.send(Event::Error(e.to_string()));
                        continue;
                    }
                },
            };
            let m = &self.metrics;
            m.requests_received.fetch_add(1, Relaxed);
            m.prompt_tokens.fetch_add(r.prompt.len() as u64, Relaxed);
            m.prefill_tokens
                .fetch_add((r.prompt.len() - cached) as u64, Relaxed);
            self.running.push(Seq {
                prompt_len: r.prompt.len(),
                tokens: r.prompt,
                fed: cached,
                state,
                cont,
                logit_bias: r.logit_bias,
                want_logprobs: r.options.sampling.logprobs.is_some(),
                events: r.events,
                cached,
                arrived: r.arrived,
                last_token: None,
                scheduled: 0,
            });
        }
    }

    /// Plans which tokens of which sequences this step feeds: every decoding sequence's one
    /// pending token, then prompt chunks in arrival order while the token budget lasts. A chunk
    /// that crosses a snapshot boundary stops there, so the prefix cache can keep the state
    /// (costing prompts that span a boundary one extra step for their tail).
    fn plan(&mut self) {
        let mut used = 0;
        for s in &mut self.running {
            s.scheduled = if s.decoding() {
                s.tokens.len() - s.fed
            } else {
                0
            };
            used += s.scheduled;
        }
        let block = self.cache.block();
        let caching = self.config.prefix_cache_bytes > 0;
        for s in self.running.iter_mut().filter(|s| !s.decoding()) {
            let left = self.config.max_batch_tokens.saturating_sub(used);
            if left == 0 {
                break;
            }
            let mut end = s.prompt_len.min(s.fed + left);
            // Stop at the last snapshot boundary inside the chunk (the rest follows next step),
            // so every prompt leaves in the cache its longest block-aligned prefix that a repeat
            // of the prompt can use (shorter than the prompt: its last token is always fed).
            let cut = if end == s.prompt_len {
                (end - 1) / block * block
            } else {
                end / block * block
            };
            if caching && cut > s.fed {
                end = cut;
            }
            s.scheduled = end - s.fed;
            used += s.scheduled;
        }
    }

    fn step(&mut self) {
        self.plan();
        let t = Instant::now();
        let results = self.forward_scheduled();
        self.metrics.step.observe(t.elapsed().as_secs_f64());
        self.metrics.forward_steps.fetch_add(1, Relaxed);
        let mut results = results.into_iter();
        let mut keep = Vec::with_capacity(self.running.len());
        for mut s in std::mem::take(&mut self.running) {
            if s.scheduled == 0 {
                keep.push(s);
                continue;
            }
            let result = results
                .next()
                .unwrap_or_else(|| Err("the backend returned too few results".to_owned()));
            let row = match result {
                Ok(row) => row,
                Err(e) => {
                    self.metrics.requests_failed.fetch_add(1, Relaxed);
                    let _ = s.events.send(Event::Error(e));
                    continue;
                }
            };
            s.fed += std::mem::take(&mut s.scheduled);
            if self.cache.is_boundary(s.fed) {
                let bytes = self.backend.state_bytes(&s.state);
                // Copied only when it will be kept; one that cannot be copied (device memory)
                // is not kept.
                if self.cache.would_keep(&s.tokens[..s.fed], bytes) {
                    if let Ok(copy) = self.backend.copy_state(&s.state) {
                        self.cache.insert(&s.tokens[..s.fed], copy, bytes);
                    }
                }
            }
            if s.fed < s.tokens.len() || sample(&mut s, row, &self.metrics) {
                keep.push(s);
            }
        }
        self.running = keep;
    }

    /// Runs the planned tokens in one batched forward; returns each scheduled sequence's
    /// logits (in running order) or its error. A refused batch (the backend checks inputs before
    /// changing any state) is retried one sequence at a time so only the offending ones fail; a
    /// panic may have left states half-updated, so it fails the whole batch.
    fn forward_scheduled(&mut self) -> Vec<Result<Vec<f32>, String>> {
        let backend = &self.backend;
        let mut items: Vec<BatchItem<B::State>> = self
            .running
            .iter_mut()
            .filter(|s| s.scheduled > 0)
            .map(|s| BatchItem {
                tokens: &s.tokens[s.fed..s.fed + s.scheduled],
                want_logits: s.fed + s.scheduled == s.tokens.len(),
                state: &mut s.state,
            })
            .collect();
        let n = items.len();
        match std::panic::catch_unwind(AssertUnwindSafe(|| backend.forward(&mut items))) {
            Ok(Ok(rows)) => rows.into_iter().map(Ok).collect(),
            Ok(Err(e)) if n == 1 => vec![Err(e.to_string())],
            Ok(Err(_)) => items
                .iter_mut()
                .map(|it| {
                    let mut one = [BatchItem {
                        state: &mut *it.state,
                        tokens: it.tokens,
                        want_logits: it.want_logits,
                    }];
                    match std::panic::catch_unwind(AssertUnwindSafe(|| backend.forward(&mut one))) {
                        Ok(Ok(mut rows)) => Ok(rows.pop().unwrap_or_default()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("internal error in the forward pass".to_owned()),
                    }
                })
                .collect(),
            Err(_) => vec![Err("internal error in the forward pass".to_owned()); n],
        }
    }
}

/// Samples the next token of a sequence whose whole history has been fed and reports it.
/// Returns false when the sequence is finished (or its client is gone).
fn sample<S>(s: &mut Seq<S>, mut logits: Vec<f32>, m: &Metrics) -> bool {
    for &(id, b) in &s.logit_bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += b;
        }
    }
    let step = match s.cont.push_logits(&mut logits) {
        Ok(step) => step,
        Err(e) => {
            m.requests_failed.fetch_add(1, Relaxed);
            let _ = s.events.send(Event::Error(e.to_string()));
            return false;
        }
    };
    let now = Instant::now();
    match s.last_token {
        None => m.ttft.observe((now - s.arrived).as_secs_f64()),
        Some(prev) => m.inter_token.observe((now - prev).as_secs_f64()),
    }
    s.last_token = Some(now);
    m.generation_tokens.fetch_add(1, Relaxed);
    let token = step.sampled.token;
    s.tokens.push(token);
    let sent = s.events.send(Event::Token {
        token,
        text: step.text,
        logprobs: s.want_logprobs.then_some(step.sampled),
    });
    if sent.is_err() {
        m.requests_cancelled.fetch_add(1, Relaxed);
        return false;
    }
    let Some(finish_reason) = step.finish else {
        return true;
    };
    match finish_reason {
        FinishReason::Stop => m.finished_stop.fetch_add(1, Relaxed),
        FinishReason::Length => m.finished_length.fetch_add(1, Relaxed),
    };
    m.e2e.observe((now - s.arrived).as_secs_f64());
    let _ = s.events.send(Event::Done(Usage {
        finish_reason,
        prompt_tokens: s.prompt_len,
        completion_tokens: s.cont.generated().len(),
        cached_tokens: s.cached,
    }));
    false
}
