//! The server over real HTTP on loopback: the demo model (random weights, real tokenizer) for
//! batching and prefix-cache behaviour, and a scripted backend (a model whose "logits" spell a
//! fixed completion) for tool-call parsing, which random weights never produce.

use dsv4_core::chat::tokens::{EOS_ID, THINK_END_ID};
use dsv4_core::tokenizer::Tokenizer;
use dsv4_core::{synthetic, Model};
use dsv4_server::{Backend, BatchItem, CpuBackend, EngineConfig, ServerConfig};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

async fn start<B: Backend>(backend: B, engine: EngineConfig, api_key: Option<&str>) -> String {
    let config = ServerConfig {
        model_name: "test-model".into(),
        api_key: api_key.map(str::to_owned),
        engine,
    };
    let app = dsv4_server::app(backend, Tokenizer::embedded().expect("tokenizer"), config)
        .expect("engine starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { dsv4_server::serve(listener, app).await });
    url
}

fn demo() -> CpuBackend {
    let ck = synthetic::checkpoint(synthetic::demo_config(), 0x5eed).expect("demo checkpoint");
    CpuBackend::new(Model::load(&ck).expect("demo model"))
}

fn small_engine() -> EngineConfig {
    EngineConfig {
        max_running: 8,
        max_waiting: 64,
        max_batch_tokens: 48,
        prefix_block: 16,
        prefix_cache_bytes: 64 << 20,
    }
}

async fn post(url: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON body"))
}

/// The `data:` payloads of an SSE response, up to and including `[DONE]`.
async fn sse(url: &str, path: &str, body: Value) -> Vec<String> {
    let r = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// A prompt of token ids that differs per `k` (ids inside the demo vocabulary).
fn prompt(k: u32, len: u32) -> Vec<u32> {
    (0..len)
        .map(|i| 1000 + (i * 7919 + k * 104729) % 120000)
        .collect()
}

fn completion_body(k: u32, len: u32, stream: bool) -> Value {
    json!({"model": "test-model", "prompt": prompt(k, len), "max_tokens": 12,
           "temperature": 0, "ignore_eos": true, "stream": stream,
           "stream_options": {"include_usage": true}})
}

/// Greedy outputs are identical alone and among concurrent requests (batched decode, chunked
/// prefill interleaved), streamed or not, and resuming from the prefix cache changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_get_their_solo_outputs_and_reuse_prefixes() {
    let url = start(demo(), small_engine(), None).await;
    let lens = [40, 7, 70, 33, 16, 90];
    let mut solo = Vec::new();
    for (k, &len) in lens.iter().enumerate() {
        let (st, v) = post(
            &url,
            "/v1/completions",
            completion_body(k as u32, len, false),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(v["usage"]["completion_tokens"], 12);
        solo.push(v["choices"][0]["text"].as_str().expect("text").to_owned());
    }
    // All at once, half of them streamed; every prompt of more than 16 tokens now finds its
    // longest block-aligned prefix (shorter than the prompt) in the cache.
    let tasks: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(k, &len)| {
            let url = url.clone();
            tokio::spawn(async move {
                if k % 2 == 0 {
                    let events = sse(
                        &url,
                        "/v1/completions",
                        completion_body(k as u32, len, true),
                    )
                    .await;
                    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
                    let chunks: Vec<Value> = events[..events.len() - 1]
                        .iter()
                        .map(|e| serde_json::from_str(e).expect("chunk JSON"))
                        .collect();
                    let text: String = chunks
                        .iter()
                        .filter_map(|c| c["choices"].get(0))
                        .filter_map(|c| c["text"].as_str())
                        .collect();
                    let usage = chunks.last().expect("usage chunk")["usage"].clone();
                    (text, usage)
                } else {
                    let (st, v) = post(
                        &url,
                        "/v1/completions",
                        completion_body(k as u32, len, false),
                    )
                    .await;
                    assert_eq!(st, 200, "{v}");
                    (
                        v["choices"][0]["text"].as_str().expect("text").to_owned(),
                        v["usage"].clone(),
                    )
                }
            })
        })
        .collect();
    for (k, t) in tasks.into_iter().enumerate() {
        let (text, usage) = t.await.expect("task");
        assert_eq!(text, solo[k], "request {k} differs when batched");
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached");
        let want = (lens[k] as u64 - 1) / 16 * 16;
        assert_eq!(
            cached, want,
            "request {k} (prompt {}) reuses its cached prefix",
            lens[k]
        );
    }
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("dsv4_prefix_cache_lookups_total{result=\"hit\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dsv4_generation_tokens_total 144"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_and_counts_usage() {
    let url = start(demo(), small_engine(), None).await;
    let body = json!({"model": "test-model", "messages": [{"role": "user", "content": "Hello"}],
                      "max_completion_tokens": 5, "temperature": 0, "ignore_eos": true,
                      "logprobs": true, "top_logprobs": 3});
    let (st, full) = post(&url, "/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{full}");
    let choice = &full["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(
        choice["logprobs"]["content"].as_array().map(Vec::len),
        Some(5)
    );
    assert_eq!(
        choice["logprobs"]["content"][0]["top_logprobs"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    let mut sbody = body;
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let events = sse(&url, "/v1/chat/completions", sbody).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|c| c["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        choice["message"]["content"].as_str().expect("content")
    );
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], full["usage"]);
    // n = 3 with a seed: three choices, seeded alike on every run.
    let nbody = json!({"model": "test-model", "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 4, "n": 3, "seed": 5, "ignore_eos": true});
    let (_, a) = post(&url, "/v1/chat/completions", nbody.clone()).await;
    let (_, b) = post(&url, "/v1/chat/completions", nbody).await;
    assert_eq!(a["choices"].as_array().map(Vec::len), Some(3));
    assert_eq!(a["choices"], b["choices"]);
    assert_eq!(a["usage"]["completion_tokens"], 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let url = start(demo(), small_engine(), None).await;
    let client = reqwest::Client::new();
    let raw = client
        .post(format!("{url}/v1/chat/completions"))
        .body("{not json")
        .send()
        .await
        .expect("request");
    assert_eq!(raw.status(), 400);
    let v: Value = raw.json().await.expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let msgs = json!([{"role": "user", "content": "x"}]);
    let cases = [
        (
            json!({"model": "test-model", "messages": msgs, "bogus": 1}),
            400,
            Some("bogus"),
        ),
        (
            json!({"model": "test-model", "messages": msgs, "temperature": "hot"}),
            400,
            None,
        ),
        (json!({"model": "test-model", "messages": "x"}), 400, None),
        (
            json!({"model": "test-model", "messages": msgs, "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"model": "test-model", "messages": msgs, "n": 99}),
            400,
            Some("n"),
        ),
        (
            json!({"model": "test-model", "messages": msgs, "top_k": -5}),
            400,
            Some("top_k"),
        ),
        (
            json!({"model": "test-model", "messages": msgs, "reasoning_effort": "huge"}),
            400,
            Some("reasoning_effort"),
        ),
        (json!({"model": "other", "messages": msgs}), 404, None),
    ];
    for (body, status, param) in cases {
        let (st, v) = post(&url, "/v1/chat/completions", body.clone()).await;
        assert_eq!(st, status, "{body} → {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{v}");
        }
    }
    let long: Vec<u32> = vec![1000; 65536];
    let (st, v) = post(
        &url,
        "/v1/completions",
        json!({"model": "test-model", "prompt": long}),
    )
    .await;
    assert_eq!(st, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("context"),
        "{v}"
    );
    let (st, _) = post(
        &url,
        "/v1/completions",
        json!({"model": "test-model", "prompt": [1, 999999]}),
    )
    .await;
    assert_eq!(st, 400);
    // The server still works after all that.
    let (st, _) = post(
        &url,
        "/v1/completions",
        json!({"model": "test-model", "prompt": "ok", "max_tokens": 2}),
    )
    .await;
    assert_eq!(st, 200);
    let r = client
        .get(format!("{url}/v2/nothing"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_enforced_on_v1_only() {
    let url = start(demo(), small_engine(), Some("s3cret")).await;
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
    let r = client
        .get(format!("{url}/v1/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
    let r = client
        .get(format!("{url}/v1/models"))
        .bearer_auth("s3cret")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["data"][0]["id"], "test-model");
    let r = client
        .get(format!("{url}/health"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
}

async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}

async fn wait_for(url: &str, name: &str, want: f64) {
    for _ in 0..600 {
        if metric(url, name).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} never reached {want}");
}

/// With one running slot and one waiting slot, a third request is refused with 429; dropping
/// the clients cancels their sequences and frees the engine, which then serves new requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_429_and_disconnects_cancel() {
    let engine = EngineConfig {
        max_running: 1,
        max_waiting: 1,
        ..small_engine()
    };
    let url = start(demo(), engine, None).await;
    let long = json!({"model": "test-model", "prompt": "tell me", "max_tokens": 60000,
                      "ignore_eos": true, "stream": true});
    let client = reqwest::Client::new();
    let a = client
        .post(format!("{url}/v1/completions"))
        .json(&long)
        .send()
        .await
        .expect("a");
    let mut a_body = a.bytes_stream();
    assert!(a_body.next().await.is_some(), "a streams");
    wait_for(&url, "dsv4_running_sequences", 1.0).await;
    let b = client
        .post(format!("{url}/v1/completions"))
        .json(&long)
        .send()
        .await
        .expect("b");
    assert_eq!(b.status(), 200);
    wait_for(&url, "dsv4_queue_depth", 1.0).await;
    let (st, v) = post(&url, "/v1/completions", long.clone()).await;
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_exceeded");
    drop(a_body);
    drop(b);
    wait_for(&url, "dsv4_running_sequences", 0.0).await;
    wait_for(&url, "dsv4_queue_depth", 0.0).await;
    assert_eq!(metric(&url, "dsv4_requests_cancelled_total").await, 2.0);
    let (st, _) = post(
        &url,
        "/v1/completions",
        json!({"model": "test-model", "prompt": "ok", "max_tokens": 2}),
    )
    .await;
    assert_eq!(st, 200);
}

/// A backend that "generates" a fixed completion: after the prompt (which ends with the chat
/// format's `</think>`), the logits single out the script's next token, then EOS.
struct Scripted {
    script: Vec<u32>,
    vocab: usize,
    /// A token the backend refuses (as a model refuses bad input: before changing any state).
    poison: Option<u32>,
    /// States cannot be copied while set (a GPU out of memory for a snapshot).
    copy_fails: Arc<AtomicBool>,
    /// New states cannot be made while set.
    new_fails: Arc<AtomicBool>,
}

impl Scripted {
    fn new(script: Vec<u32>, vocab: usize) -> Self {
        Scripted {
            script,
            vocab,
            poison: None,
            copy_fails: Arc::default(),
            new_fails: Arc::default(),
        }
    }
}

impl Backend for Scripted {
    type State = Vec<u32>;
    fn new_state(&self) -> dsv4_core::Result<Vec<u32>> {
        if self.new_fails.load(Ordering::Relaxed) {
            return Err(dsv4_core::Error::Input(
                "no memory for a new sequence".into(),
            ));
        }
        Ok(Vec::new())
    }
    fn copy_state(&self, s: &Vec<u32>) -> dsv4_core::Result<Vec<u32>> {
        if self.copy_fails.load(Ordering::Relaxed) {
            return Err(dsv4_core::Error::Input("no memory for a snapshot".into()));
        }
        Ok(s.clone())
    }
    fn state_bytes(&self, s: &Vec<u32>) -> usize {
        s.len() * 4
    }
    fn forward(&self, batch: &mut [BatchItem<'_, Vec<u32>>]) -> dsv4_core::Result<Vec<Vec<f32>>> {
        if let Some(p) = self.poison {
            if batch.iter().any(|b| b.tokens.contains(&p)) {
                return Err(dsv4_core::Error::Input(format!("token {p} refused")));
            }
        }
        Ok(batch
            .iter_mut()
            .map(|b| {
                b.state.extend_from_slice(b.tokens);
                if !b.want_logits {
                    return Vec::new();
                }
                let start = b
                    .state
                    .iter()
                    .rposition(|&t| t == THINK_END_ID)
                    .map_or(0, |p| p + 1);
                let next = self
                    .script
                    .get(b.state.len() - start)
                    .copied()
                    .unwrap_or(EOS_ID);
                let mut l = vec![0f32; self.vocab];
                l[next as usize] = 30.0;
                l
            })
            .collect())
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn max_context(&self) -> usize {
        4096
    }
}

const CALLS: &str = "Checking.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"add\">\n<｜DSML｜parameter name=\"a\" string=\"false\">2</｜DSML｜parameter>\n<｜DSML｜parameter name=\"b\" string=\"false\">[3]</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsml_tool_calls_become_tool_calls_streamed_and_not() {
    let tok = Tokenizer::embedded().expect("tokenizer");
    let backend = Scripted::new(tok.encode(CALLS).expect("encode"), tok.vocab_size());
    let url = start(backend, small_engine(), None).await;
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]);
    let body = json!({"model": "test-model", "tools": tools, "temperature": 0,
                      "messages": [{"role": "user", "content": "Weather in Paris? And 2+[3]?"}]});
    let (st, v) = post(&url, "/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "Checking.");
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .expect("tool calls");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().expect("args"))
            .expect("JSON");
    assert_eq!(args, json!({"city": "Paris"}));
    let args: Value =
        serde_json::from_str(calls[1]["function"]["arguments"].as_str().expect("args"))
            .expect("JSON");
    assert_eq!(args, json!({"a": 2, "b": [3]}));

    let mut sbody = body;
    sbody["stream"] = json!(true);
    let events = sse(&url, "/v1/chat/completions", sbody).await;
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk"))
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Checking.");
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(deltas.len(), 2);
    assert_eq!(
        (deltas[0]["index"].clone(), deltas[1]["index"].clone()),
        (json!(0), json!(1))
    );
    assert_eq!(deltas[1]["function"]["name"], "add");
    assert_eq!(
        chunks.last().expect("last")["choices"][0]["finish_reason"],
        "tool_calls"
    );
    // No DSML leaks into the streamed text.
    assert!(!events.iter().any(|e| e.contains("｜DSML｜")));
}

/// A request the backend refuses fails alone (500 with an error body); requests batched with it
/// complete normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_request_does_not_disturb_the_others() {
    let tok = Tokenizer::embedded().expect("tokenizer");
    let backend = Scripted {
        poison: Some(4242),
        ..Scripted::new(
            tok.encode("All fine here.").expect("encode"),
            tok.vocab_size(),
        )
    };
    let url = start(backend, small_engine(), None).await;
    let good = json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}]});
    let bad = json!({"model": "test-model", "prompt": [0, 4242, THINK_END_ID], "max_tokens": 3});
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            let (path, body) = if i % 3 == 1 {
                ("/v1/completions", bad.clone())
            } else {
                ("/v1/chat/completions", good.clone())
            };
            tokio::spawn(async move { (i, post(&url, path, body).await) })
        })
        .collect();
    for t in tasks {
        let (i, (st, v)) = t.await.expect("task");
        if i % 3 == 1 {
            assert_eq!(st, 500, "{v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .expect("msg")
                    .contains("refused"),
                "{v}"
            );
        } else {
            assert_eq!(st, 200, "{v}");
            assert_eq!(v["choices"][0]["message"]["content"], "All fine here.");
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
        }
    }
}

/// When a cached snapshot cannot be copied (a GPU without memory for it), the request is served
/// from scratch with the same output and the lookup counts as a miss; when no new state can be
/// made, that request alone fails with an error, and the server serves again once it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_memory_failures_are_misses_or_clean_errors() {
    let tok = Tokenizer::embedded().expect("tokenizer");
    let backend = Scripted::new(tok.encode("Still fine.").expect("encode"), tok.vocab_size());
    let (copy_fails, new_fails) = (backend.copy_fails.clone(), backend.new_fails.clone());
    let url = start(backend, small_engine(), None).await;
    let long = "a shared system prompt that spans several snapshot blocks ".repeat(4);
    let body = json!({"model": "test-model", "messages": [
        {"role": "system", "content": long}, {"role": "user", "content": "hi"}]});
    // The first request leaves snapshots of its prompt in the cache.
    let (st, v) = post(&url, "/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{v}");
    let prompt0 = metric(&url, "dsv4_prompt_tokens_total").await;
    let computed0 = metric(&url, "dsv4_prefill_tokens_total").await;
    // The second finds them but cannot copy one: computed from scratch, counted as a miss.
    copy_fails.store(true, Ordering::Relaxed);
    let (st, v) = post(&url, "/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "Still fine.");
    let prompt = metric(&url, "dsv4_prompt_tokens_total").await - prompt0;
    let computed = metric(&url, "dsv4_prefill_tokens_total").await - computed0;
    assert!(prompt > 0.0 && computed == prompt, "{computed} of {prompt}");
    let hits = metric(&url, "dsv4_prefix_cache_lookups_total{result=\"hit\"}").await;
    assert_eq!(
        hits, 0.0,
        "a snapshot that could not be copied counts as a miss"
    );
    new_fails.store(true, Ordering::Relaxed);
    let (st, v) = post(&url, "/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 500, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("no memory"),
        "{v}"
    );
    new_fails.store(false, Ordering::Relaxed);
    let (st, v) = post(&url, "/v1/chat/completions", body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "Still fine.");
}
