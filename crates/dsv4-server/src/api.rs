//! Request bodies of the OpenAI endpoints. Unknown fields are rejected (400) rather than
//! silently ignored, so a client never believes a setting took effect when it did not.

use crate::error::ApiError;
use dsv4_core::chat::{Message, ThinkingMode, Tool};
use dsv4_core::generate::GenerateOptions;
use dsv4_core::sampling::SamplingParams;
use serde::Deserialize;
use std::collections::HashMap;

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
    /// Accepted for compatibility; usage is only sent in the final chunk.
    #[serde(default)]
    pub continuous_usage_stats: bool,
}

/// Sampling and stopping fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM convention: 0 or -1 disables it.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Vec<u32>>,
    /// Keep generating past the end-of-sequence token (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Accepted and ignored (OpenAI's end-user id).
    pub user: Option<String>,
}

/// Field names of [`Sampling`].
const SAMPLING_FIELDS: &[&str] = &[
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "logit_bias",
    "n",
    "stream",
    "stream_options",
    "user",
];

/// Field names of [`ChatRequest`] besides the sampling ones.
const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
    "thinking",
    "chat_template_kwargs",
    "response_format",
];

/// Field names of [`CompletionRequest`] besides the sampling ones.
const COMPLETION_FIELDS: &[&str] = &["model", "prompt", "logprobs", "echo"];

/// Parses a request body: malformed JSON, a non-object, an unknown field or a mistyped one is
/// a 400 naming the problem. (Checked by hand: serde cannot deny unknown fields of a struct
/// with a flattened part.)
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8], fields: &[&str]) -> Result<T, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("the body must be a JSON object"))?;
    if let Some(k) = obj
        .keys()
        .find(|k| !fields.contains(&k.as_str()) && !SAMPLING_FIELDS.contains(&k.as_str()))
    {
        return Err(ApiError::invalid_param(k, format!("unknown field `{k}`")));
    }
    serde_json::from_value(v).map_err(|e| ApiError::invalid(format!("invalid request: {e}")))
}

impl ChatRequest {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        parse_body(body, CHAT_FIELDS)
    }
}

impl CompletionRequest {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        parse_body(body, COMPLETION_FIELDS)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub sampling: Sampling,
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<serde_json::Value>,
    /// Accepted; the model may emit several calls in one block either way.
    pub parallel_tool_calls: Option<bool>,
    /// `none`/`minimal` → no reasoning; `low`/`medium`/`high` → thinking; `max` → maximum effort.
    pub reasoning_effort: Option<String>,
    /// DeepSeek/Anthropic style: `{"type": "enabled" | "disabled"}`.
    pub thinking: Option<serde_json::Value>,
    /// vLLM style: `{"thinking": true, "reasoning_effort": "max"}`.
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Only `{"type": "text"}` is supported.
    pub response_format: Option<serde_json::Value>,
}

/// `prompt`: text, token ids, or a list of either.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Top-N log-probabilities per token (legacy integer form).
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: bool,
}

/// Most top log-probabilities returned per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The thinking mode a chat request asks for (default: no reasoning).
pub fn thinking_mode(r: &ChatRequest) -> Result<ThinkingMode, ApiError> {
    let from_effort = |e: &str| match e {
        "none" | "minimal" => Ok(ThinkingMode::Chat),
        "low" | "medium" | "high" => Ok(ThinkingMode::Thinking),
        "max" => Ok(ThinkingMode::ThinkingMax),
        other => Err(ApiError::invalid_param(
            "reasoning_effort",
            format!("unknown reasoning_effort `{other}` (none, low, medium, high or max)"),
        )),
    };
    let mut mode = ThinkingMode::Chat;
    if let Some(kw) = &r.chat_template_kwargs {
        match kw.get("thinking").or_else(|| kw.get("enable_thinking")) {
            Some(serde_json::Value::Bool(true)) => mode = ThinkingMode::Thinking,
            Some(serde_json::Value::Bool(false)) | None => {}
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "chat_template_kwargs",
                    "`thinking` must be a boolean",
                ))
            }
        }
        if let Some(e) = kw.get("reasoning_effort").and_then(|v| v.as_str()) {
            if mode.is_thinking() {
                mode = from_effort(e)?;
            }
        }
    }
    if let Some(t) = &r.thinking {
        mode = match t.get("type").and_then(|v| v.as_str()) {
            Some("enabled") => ThinkingMode::Thinking,
            Some("disabled") => ThinkingMode::Chat,
            _ => {
                return Err(ApiError::invalid_param(
                    "thinking",
                    "expected {\"type\": \"enabled\"} or {\"type\": \"disabled\"}",
                ))
            }
        };
    }
    if let Some(e) = &r.reasoning_effort {
        mode = from_effort(e)?;
    }
    Ok(mode)
}

/// The tools to render into the prompt under `tool_choice`: all of them for `auto`/`required`
/// (decoding is not constrained, so `required` is a request the model usually follows), none for
/// `none`, one for a named function.
pub fn effective_tools(r: &ChatRequest) -> Result<Vec<Tool>, ApiError> {
    let tools = r.tools.clone().unwrap_or_default();
    let bad = || {
        ApiError::invalid_param(
            "tool_choice",
            "expected \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )
    };
    match &r.tool_choice {
        None => Ok(tools),
        Some(serde_json::Value::String(s)) => match s.as_str() {
            "none" => Ok(Vec::new()),
            "auto" | "required" => Ok(tools),
            _ => Err(bad()),
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(|n| n.as_str())
                .ok_or_else(bad)?;
            let picked: Vec<Tool> = tools
                .into_iter()
                .filter(|t| t.function.name == name)
                .collect();
            if picked.is_empty() {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("tool_choice names `{name}`, which is not in `tools`"),
                ));
            }
            Ok(picked)
        }
    }
}

/// Generation options from the request fields; `max_tokens` defaults to the rest of the
/// context, `logprobs` is the number of top alternatives wanted (`Some(0)`: only the chosen
/// token's).
pub fn generate_options(
    s: &Sampling,
    max_tokens: Option<u64>,
    logprobs: Option<usize>,
    prompt_len: usize,
    max_context: usize,
    stop_ids: &[u32],
    vocab: usize,
) -> Result<GenerateOptions, ApiError> {
    if prompt_len == 0 {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    if prompt_len >= max_context {
        return Err(ApiError::invalid(format!(
            "This model's maximum context length is {max_context} tokens; the prompt has \
             {prompt_len} tokens"
        )));
    }
    let room = max_context - prompt_len;
    let max_tokens = match max_tokens {
        None => room,
        Some(0) => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                "max_tokens must be at least 1",
            ))
        }
        Some(m) if m as usize > room => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                format!(
                    "This model's maximum context length is {max_context} tokens; the prompt has \
                     {prompt_len} tokens and {m} were requested for the completion"
                ),
            ))
        }
        Some(m) => m as usize,
    };
    if let Some(n) = logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            format!("at most {MAX_TOP_LOGPROBS} top log-probabilities, got {n}"),
        ));
    }
    let top_k = match s.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be -1, 0 or positive, got {k}"),
            ))
        }
    };
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(1.0),
        top_k,
        top_p: s.top_p.unwrap_or(1.0),
        min_p: s.min_p.unwrap_or(0.0),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        seed: s.seed.map(|v| v as u64),
        logprobs,
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let stop_strings = match &s.stop {
        None => Vec::new(),
        Some(Stop::One(x)) => vec![x.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            "stop strings must not be empty",
        ));
    }
    let mut ids: Vec<u32> = if s.ignore_eos {
        Vec::new()
    } else {
        stop_ids.to_vec()
    };
    for &id in s.stop_token_ids.iter().flatten() {
        if id as usize >= vocab {
            return Err(ApiError::invalid_param(
                "stop_token_ids",
                format!("token id {id} is out of range"),
            ));
        }
        ids.push(id);
    }
    Ok(GenerateOptions {
        max_tokens,
        sampling,
        stop_ids: ids,
        stop_strings,
    })
}

/// `logit_bias` as (token id, bias) pairs; keys are token ids written as strings.
pub fn logit_bias(s: &Sampling, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let mut out = Vec::new();
    for (k, &v) in s.logit_bias.iter().flatten() {
        let id: u32 = k
            .parse()
            .ok()
            .filter(|&id: &u32| (id as usize) < vocab)
            .ok_or_else(|| {
                ApiError::invalid_param("logit_bias", format!("`{k}` is not a token id"))
            })?;
        if !(-100.0..=100.0).contains(&v) {
            return Err(ApiError::invalid_param(
                "logit_bias",
                "biases must lie in [-100, 100]",
            ));
        }
        out.push((id, v));
    }
    Ok(out)
}
