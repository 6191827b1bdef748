//! The HTTP side: axum routes for the OpenAI endpoints, `/health` and `/metrics`, API-key
//! checking, and turning engine events into JSON responses or SSE streams.

use crate::api::{self, ChatRequest, CompletionRequest, Prompt, Sampling};
use crate::chat_stream::ChatSplitter;
use crate::engine::{EngineHandle, Event, GenRequest, SubmitError, Usage};
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dsv4_core::chat::{self, ThinkingMode};
use dsv4_core::generate::GenerateOptions;
use dsv4_core::sampling::Sampled;
use dsv4_core::tokenizer::Tokenizer;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};

/// Most choices per request (`n`).
const MAX_N: usize = 16;

/// What every handler needs.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// The id clients must pass as `model`.
    pub model_name: String,
    pub max_context: usize,
    pub vocab_size: usize,
    pub api_key: Option<String>,
    pub next_id: AtomicU64,
}

impl AppState {
    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_name {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!(
                "The model `{model}` does not exist; this server serves `{}`",
                self.model_name
            ),
        ))
    }

    fn new_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:016x}",
            self.next_id.fetch_add(1, Relaxed) ^ now_secs().rotate_left(32)
        )
    }

    /// Queues `n` sequences per prompt (choice `p·n + j` is copy `j` of prompt `p`); copies
    /// after the first get successive seeds so seeded choices differ.
    fn submit(
        &self,
        prompts: Vec<(Vec<u32>, GenerateOptions)>,
        bias: &[(u32, f32)],
        n: usize,
    ) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, ApiError> {
        let arrived = Instant::now();
        let mut reqs = Vec::new();
        let mut rxs = Vec::new();
        for (prompt, opts) in prompts {
            for j in 0..n {
                let (tx, rx) = mpsc::unbounded_channel();
                let mut options = opts.clone();
                options.sampling.seed = opts.sampling.seed.map(|s| s.wrapping_add(j as u64));
                reqs.push(GenRequest {
                    prompt: prompt.clone(),
                    options,
                    logit_bias: bias.to_vec(),
                    events: tx,
                    arrived,
                });
                rxs.push(rx);
            }
        }
        match self.engine.submit(reqs) {
            Ok(()) => Ok(rxs),
            Err(e @ SubmitError::QueueFull(_)) => Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                e.to_string(),
            )),
            Err(e @ SubmitError::Stopped) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                e.to_string(),
            )),
        }
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id]).unwrap_or_default()
    }

    fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.tokenizer
            .token_bytes(id)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The server's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            check_api_key,
        ))
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

/// With `--api-key`, every `/v1` route needs `Authorization: Bearer KEY`.
async fn check_api_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        if req.uri().path().starts_with("/v1") {
            let ok = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|given| constant_time_eq(given.as_bytes(), key.as_bytes()));
            if !ok {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "Incorrect or missing API key (Authorization: Bearer KEY)",
                )
                .into_response();
            }
        }
    }
    next.run(req).await
}

/// Compares keys without an early exit (no timing hint about how much of a guess was right).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.engine.is_alive() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "engine stopped").into_response()
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.engine.metrics.render(),
    )
        .into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": st.model_name, "object": "model", "created": now_secs(), "owned_by": "dsv4",
        "max_model_len": st.max_context,
    }]}))
}

/// The `usage` object of a response, over all its choices (each prompt counted once).
fn usage_json(prompt_tokens: usize, usages: &[Usage]) -> Value {
    let completion: usize = usages.iter().map(|u| u.completion_tokens).sum();
    let cached: usize = usages.iter().map(|u| u.cached_tokens).max().unwrap_or(0);
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn check_n(s: &Sampling) -> Result<usize, ApiError> {
    match s.n.unwrap_or(1) {
        n @ 1..=MAX_N => Ok(n),
        n => Err(ApiError::invalid_param(
            "n",
            format!("n must be between 1 and {MAX_N}, got {n}"),
        )),
    }
}

fn include_usage(s: &Sampling) -> bool {
    s.stream_options.as_ref().is_some_and(|o| o.include_usage)
}

fn engine_error(msg: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg)
}

/// Everything one choice produced, for non-streaming responses.
#[derive(Default)]
struct Collected {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<Sampled>,
    usage: Option<Usage>,
}

/// Reads every choice's events to the end.
async fn collect(rxs: Vec<mpsc::UnboundedReceiver<Event>>) -> Result<Vec<Collected>, ApiError> {
    let all = futures_util::future::join_all(rxs.into_iter().map(|mut rx| async move {
        let mut c = Collected::default();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token {
                    token,
                    text,
                    logprobs,
                } => {
                    c.text.push_str(&text);
                    c.tokens.push(token);
                    c.logprobs.extend(logprobs);
                }
                Event::Done(u) => {
                    c.usage = Some(u);
                    return Ok(c);
                }
                Event::Error(e) => return Err(engine_error(e)),
            }
        }
        Err(engine_error("the engine dropped the request".into()))
    }))
    .await;
    all.into_iter().collect()
}

/// Merges the choices' event streams, tagging each event with its choice index.
fn merged(
    rxs: Vec<mpsc::UnboundedReceiver<Event>>,
) -> impl stream::Stream<Item = (usize, Event)> + Unpin {
    stream::select_all(
        rxs.into_iter()
            .enumerate()
            .map(|(i, rx)| UnboundedReceiverStream::new(rx).map(move |e| (i, e))),
    )
}

type SseTx = mpsc::Sender<Result<SseEvent, Infallible>>;

/// Runs `produce` in a task feeding an SSE response. When the client goes away the response
/// body is dropped, the task ends at its next send (or at once while it waits for the engine),
/// and the engine's receivers are dropped with it, which cancels the sequences.
fn sse_response<F, Fut>(produce: F) -> Response
where
    F: FnOnce(SseTx) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let watch = tx.clone();
    let fut = produce(tx);
    tokio::spawn(async move {
        tokio::select! {
            () = fut => {}
            () = watch.closed() => {}
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn send_json(tx: &SseTx, v: &Value) -> bool {
    tx.send(Ok(SseEvent::default().data(v.to_string())))
        .await
        .is_ok()
}

async fn send_done(tx: &SseTx) {
    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
}

fn stream_error(msg: &str) -> Value {
    json!({"error": {"message": msg, "type": "server_error", "param": null, "code": 500}})
}

// ----- /v1/chat/completions -----

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = ChatRequest::parse(&body)?;
    st.check_model(&req.model)?;
    if let Some(rf) = &req.response_format {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid_param(
                "response_format",
                "only {\"type\": \"text\"} is supported",
            ));
        }
    }
    let mode = api::thinking_mode(&req)?;
    let tools = api::effective_tools(&req)?;
    let text = chat::encode_messages(&req.messages, &tools, mode)
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
    let prompt = st
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ))
        }
    };
    let max = req.max_completion_tokens.or(req.sampling.max_tokens);
    let opts = api::generate_options(
        &req.sampling,
        max,
        logprobs,
        prompt.len(),
        st.max_context,
        chat::stop_token_ids(),
        st.vocab_size,
    )?;
    let bias = api::logit_bias(&req.sampling, st.vocab_size)?;
    let n = check_n(&req.sampling)?;
    let prompt_len = prompt.len();
    let rxs = st.submit(vec![(prompt, opts)], &bias, n)?;
    let ctx = ChatCtx {
        st: Arc::clone(&st),
        id: st.new_id("chatcmpl"),
        created: now_secs(),
        mode,
        logprobs: logprobs.is_some(),
        prompt_len,
    };
    if req.sampling.stream {
        let usage = include_usage(&req.sampling);
        Ok(sse_response(move |tx| ctx.stream(rxs, usage, tx)))
    } else {
        let choices = collect(rxs).await?;
        Ok(Json(ctx.response(choices)).into_response())
    }
}

struct ChatCtx {
    st: Arc<AppState>,
    id: String,
    created: u64,
    mode: ThinkingMode,
    logprobs: bool,
    prompt_len: usize,
}

impl ChatCtx {
    fn logprob_entry(&self, s: &Sampled) -> Value {
        json!({
            "token": self.st.token_text(s.token),
            "logprob": s.logprob,
            "bytes": self.st.token_bytes(s.token),
            "top_logprobs": s.top_logprobs.iter().map(|&(t, lp)| json!({
                "token": self.st.token_text(t), "logprob": lp, "bytes": self.st.token_bytes(t),
            })).collect::<Vec<_>>(),
        })
    }

    fn logprobs_json(&self, entries: &[Sampled]) -> Value {
        if self.logprobs {
            json!({"content": entries.iter().map(|s| self.logprob_entry(s)).collect::<Vec<_>>()})
        } else {
            Value::Null
        }
    }

    fn tool_call_json(&self, choice: usize, k: usize, call: &chat::ParsedToolCall) -> Value {
        json!({
            "id": format!("call_{}_{choice}_{k}", self.id.trim_start_matches("chatcmpl-")),
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        })
    }

    fn response(&self, choices: Vec<Collected>) -> Value {
        let mut usages = Vec::new();
        let out: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut sp = ChatSplitter::new(self.mode);
                let d1 = sp.push(&c.text);
                let (d2, calls) = sp.finish();
                let reasoning = d1.reasoning + &d2.reasoning;
                let content = d1.content + &d2.content;
                let usage = c.usage.expect("collected choices are finished");
                usages.push(usage);
                let mut msg = json!({"role": "assistant", "content": content});
                if self.mode.is_thinking() {
                    msg["reasoning_content"] = json!(reasoning);
                }
                let finish = if calls.is_empty() {
                    usage.finish_reason.as_str()
                } else {
                    if content.is_empty() {
                        msg["content"] = Value::Null;
                    }
                    msg["tool_calls"] = calls
                        .iter()
                        .enumerate()
                        .map(|(k, call)| self.tool_call_json(i, k, call))
                        .collect();
                    "tool_calls"
                };
                json!({"index": i, "message": msg, "logprobs": self.logprobs_json(&c.logprobs),
                       "finish_reason": finish})
            })
            .collect();
        json!({
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.st.model_name, "choices": out,
            "usage": usage_json(self.prompt_len, &usages),
        })
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.st.model_name, "choices": choices})
    }

    fn delta_chunk(&self, i: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
        self.chunk(
            json!([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]),
        )
    }

    async fn stream(
        self,
        rxs: Vec<mpsc::UnboundedReceiver<Event>>,
        include_usage: bool,
        tx: SseTx,
    ) {
        let n = rxs.len();
        let mut splitters: Vec<ChatSplitter> =
            (0..n).map(|_| ChatSplitter::new(self.mode)).collect();
        let mut usages = Vec::new();
        for i in 0..n {
            let first = self.delta_chunk(
                i,
                json!({"role": "assistant", "content": ""}),
                Value::Null,
                None,
            );
            if !send_json(&tx, &first).await {
                return;
            }
        }
        let mut events = merged(rxs);
        while let Some((i, ev)) = events.next().await {
            let msg = match ev {
                Event::Token { text, logprobs, .. } => {
                    let d = splitters[i].push(&text);
                    let lp = match &logprobs {
                        Some(s) if self.logprobs => json!({"content": [self.logprob_entry(s)]}),
                        _ => Value::Null,
                    };
                    if d.reasoning.is_empty() && d.content.is_empty() && lp.is_null() {
                        continue;
                    }
                    self.delta_chunk(i, text_delta(&d.reasoning, &d.content), lp, None)
                }
                Event::Done(u) => {
                    usages.push(u);
                    let (d, calls) = splitters[i].finish();
                    if (!d.reasoning.is_empty() || !d.content.is_empty())
                        && !send_json(
                            &tx,
                            &self.delta_chunk(
                                i,
                                text_delta(&d.reasoning, &d.content),
                                Value::Null,
                                None,
                            ),
                        )
                        .await
                    {
                        return;
                    }
                    for (k, call) in calls.iter().enumerate() {
                        let mut c = self.tool_call_json(i, k, call);
                        c["index"] = json!(k);
                        let delta = json!({"tool_calls": [c]});
                        if !send_json(&tx, &self.delta_chunk(i, delta, Value::Null, None)).await {
                            return;
                        }
                    }
                    let finish = if calls.is_empty() {
                        u.finish_reason.as_str()
                    } else {
                        "tool_calls"
                    };
                    self.delta_chunk(i, json!({}), Value::Null, Some(finish))
                }
                Event::Error(e) => stream_error(&e),
            };
            if !send_json(&tx, &msg).await {
                return;
            }
        }
        if include_usage {
            let mut last = self.chunk(json!([]));
            last["usage"] = usage_json(self.prompt_len, &usages);
            if !send_json(&tx, &last).await {
                return;
            }
        }
        send_done(&tx).await;
    }
}

fn text_delta(reasoning: &str, content: &str) -> Value {
    let mut d = json!({});
    if !reasoning.is_empty() {
        d["reasoning_content"] = json!(reasoning);
    }
    if !content.is_empty() {
        d["content"] = json!(content);
    }
    d
}

// ----- /v1/completions -----

async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req = CompletionRequest::parse(&body)?;
    st.check_model(&req.model)?;
    // Text prompts start with BOS like an encoded document; id prompts are used as they are.
    let encode = |t: &str| -> Result<Vec<u32>, ApiError> {
        let mut ids = st
            .tokenizer
            .encode(t)
            .map_err(|e| ApiError::invalid_param("prompt", e.to_string()))?;
        if ids.first() != Some(&chat::tokens::BOS_ID) {
            ids.insert(0, chat::tokens::BOS_ID);
        }
        Ok(ids)
    };
    let prompts: Vec<Vec<u32>> = match &req.prompt {
        Prompt::Text(t) => vec![encode(t)?],
        Prompt::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        Prompt::Ids(ids) => vec![ids.clone()],
        Prompt::IdLists(l) => l.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid_param("prompt", "no prompt given"));
    }
    for p in &prompts {
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= st.vocab_size) {
            return Err(ApiError::invalid_param(
                "prompt",
                format!(
                    "token id {bad} is out of range (vocabulary size {})",
                    st.vocab_size
                ),
            ));
        }
    }
    let n = check_n(&req.sampling)?;
    if prompts.len() * n > MAX_N * 4 {
        return Err(ApiError::invalid("too many prompts × n in one request"));
    }
    // OpenAI's default for this endpoint is 16 tokens.
    let max = Some(req.sampling.max_tokens.unwrap_or(16));
    let mut jobs = Vec::new();
    for p in &prompts {
        let opts = api::generate_options(
            &req.sampling,
            max,
            req.logprobs,
            p.len(),
            st.max_context,
            chat::stop_token_ids(),
            st.vocab_size,
        )?;
        jobs.push((p.clone(), opts));
    }
    let bias = api::logit_bias(&req.sampling, st.vocab_size)?;
    let rxs = st.submit(jobs, &bias, n)?;
    let echo: Vec<String> = if req.echo {
        prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(st.tokenizer.decode(p).unwrap_or_default(), n))
            .collect()
    } else {
        Vec::new()
    };
    let ctx = CompletionCtx {
        st: Arc::clone(&st),
        id: st.new_id("cmpl"),
        created: now_secs(),
        logprobs: req.logprobs.is_some(),
        prompt_tokens: prompts.iter().map(Vec::len).sum::<usize>(),
        echo,
    };
    if req.sampling.stream {
        let usage = include_usage(&req.sampling);
        Ok(sse_response(move |tx| ctx.stream(rxs, usage, tx)))
    } else {
        let choices = collect(rxs).await?;
        Ok(Json(ctx.response(choices)).into_response())
    }
}

struct CompletionCtx {
    st: Arc<AppState>,
    id: String,
    created: u64,
    logprobs: bool,
    prompt_tokens: usize,
    echo: Vec<String>,
}

impl CompletionCtx {
    /// Legacy logprobs of tokens whose text starts at `offset` in the choice's text.
    fn logprobs_json(&self, entries: &[Sampled], mut offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let mut tokens = Vec::new();
        let mut lps = Vec::new();
        let mut tops = Vec::new();
        let mut offsets = Vec::new();
        for s in entries {
            let t = self.st.token_text(s.token);
            offsets.push(offset);
            offset += t.len();
            tokens.push(t);
            lps.push(s.logprob);
            let top: serde_json::Map<String, Value> = s
                .top_logprobs
                .iter()
                .map(|&(id, lp)| (self.st.token_text(id), json!(lp)))
                .collect();
            tops.push(Value::Object(top));
        }
        json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
    }

    fn response(&self, choices: Vec<Collected>) -> Value {
        let usages: Vec<Usage> = choices.iter().filter_map(|c| c.usage).collect();
        let out: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let prefix = self.echo.get(i).map_or("", String::as_str);
                json!({
                    "index": i,
                    "text": format!("{prefix}{}", c.text),
                    "logprobs": self.logprobs_json(&c.logprobs, prefix.len()),
                    "finish_reason": c.usage.map(|u| u.finish_reason.as_str()),
                })
            })
            .collect();
        json!({
            "id": self.id, "object": "text_completion", "created": self.created,
            "model": self.st.model_name, "choices": out,
            "usage": usage_json(self.prompt_tokens, &usages),
        })
    }

    fn chunk(&self, i: usize, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
        json!({"id": self.id, "object": "text_completion", "created": self.created,
               "model": self.st.model_name,
               "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]})
    }

    async fn stream(
        self,
        rxs: Vec<mpsc::UnboundedReceiver<Event>>,
        include_usage: bool,
        tx: SseTx,
    ) {
        let mut offsets: Vec<usize> = vec![0; rxs.len()];
        for (i, e) in self.echo.iter().enumerate() {
            offsets[i] = e.len();
            if !send_json(&tx, &self.chunk(i, e, Value::Null, None)).await {
                return;
            }
        }
        let mut usages = Vec::new();
        let mut events = merged(rxs);
        while let Some((i, ev)) = events.next().await {
            let msg = match ev {
                Event::Token { text, logprobs, .. } => {
                    let lp = match &logprobs {
                        Some(s) => self.logprobs_json(std::slice::from_ref(s), offsets[i]),
                        None => Value::Null,
                    };
                    offsets[i] += text.len();
                    if text.is_empty() && lp.is_null() {
                        continue;
                    }
                    self.chunk(i, &text, lp, None)
                }
                Event::Done(u) => {
                    usages.push(u);
                    self.chunk(i, "", Value::Null, Some(u.finish_reason.as_str()))
                }
                Event::Error(e) => stream_error(&e),
            };
            if !send_json(&tx, &msg).await {
                return;
            }
        }
        if include_usage {
            let last = json!({"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.st.model_name, "choices": [],
                "usage": usage_json(self.prompt_tokens, &usages)});
            if !send_json(&tx, &last).await {
                return;
            }
        }
        send_done(&tx).await;
    }
}
