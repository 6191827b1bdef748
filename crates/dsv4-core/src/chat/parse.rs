//! Completion text → reasoning, answer and tool calls, following the official
//! `parse_message_from_completion_text` / `parse_tool_calls` of `encoding_dsv4.py`.

use super::encode::ThinkingMode;
use super::json::OrderedJson;
use super::tokens::{BOS, DSML, EOS, THINK_END, THINK_START};
use super::types::{FunctionCall, ToolCall};
use crate::error::{Error, Result};

/// A parsed assistant completion.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedMessage {
    /// The text before `</think>` (thinking modes); `None` in chat mode.
    pub reasoning_content: Option<String>,
    /// The answer (after `</think>`, before any tool-call block).
    pub content: String,
    pub tool_calls: Vec<ParsedToolCall>,
}

/// One DSML tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    pub name: String,
    /// A JSON object text, built as the official decoder does: `string="true"` values become
    /// JSON strings, other values are copied verbatim (they are JSON written by the model).
    pub arguments: String,
}

impl ParsedToolCall {
    /// The arguments parsed as JSON (fails if the model wrote an invalid non-string value).
    pub fn arguments_json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.arguments).map_err(|e| {
            Error::CompletionFormat(format!(
                "tool call `{}`: arguments are not valid JSON: {e}",
                self.name
            ))
        })
    }

    /// The OpenAI-shaped tool call with the given id.
    pub fn to_tool_call(&self, id: impl Into<String>) -> ToolCall {
        ToolCall {
            id: Some(id.into()),
            kind: "function".to_owned(),
            function: FunctionCall {
                name: self.name.clone(),
                arguments: self.arguments.clone(),
            },
        }
    }
}

fn format_err(msg: impl Into<String>) -> Error {
    Error::CompletionFormat(msg.into())
}

/// Splits a completion (the text the model generated after the prompt) into reasoning, content
/// and tool calls.
///
/// The text may end with the EOS text or without it (an engine that stops on id 1 usually does
/// not decode it). Malformed output (no `</think>` in a thinking mode, broken DSML, text after
/// EOS, special tokens inside the answer) is an [`Error::CompletionFormat`], as in the official
/// parser, which does not try to repair model output.
pub fn parse_completion(text: &str, mode: ThinkingMode) -> Result<ParsedMessage> {
    let tool_calls_start = format!("\n\n<{DSML}tool_calls");
    let mut index = 0;
    let mut reasoning = None;

    if mode.is_thinking() {
        let (next, r, stop) = read_until(text, index, &[THINK_END, &tool_calls_start]);
        if stop != Some(THINK_END) {
            return Err(format_err("missing </think> after the reasoning"));
        }
        reasoning = Some(r.to_owned());
        index = next;
    }

    let (next, content, mut stop) = read_until(text, index, &[EOS, &tool_calls_start]);
    index = next;
    let mut tool_calls = Vec::new();
    if stop == Some(tool_calls_start.as_str()) {
        let (next, calls) = parse_tool_calls(text, index)?;
        tool_calls = calls;
        let (next, tail, end) = read_until(text, next, &[EOS]);
        if !tail.is_empty() {
            return Err(format_err(format!(
                "unexpected text after the tool calls: {tail:?}"
            )));
        }
        index = next;
        stop = end;
    }
    if index != text.len() || !matches!(stop, Some(EOS) | None) {
        return Err(format_err(format!(
            "unexpected text after the end of the message: {:?}",
            &text[index.min(text.len())..]
        )));
    }
    for sp in [BOS, EOS, THINK_START, THINK_END, DSML] {
        if content.contains(sp) || reasoning.as_deref().is_some_and(|r| r.contains(sp)) {
            return Err(format_err(format!(
                "unexpected special token {sp:?} in the text"
            )));
        }
    }
    Ok(ParsedMessage {
        reasoning_content: reasoning,
        content: content.to_owned(),
        tool_calls,
    })
}

/// Official `_read_until_stop`: the text from `index` to the earliest of `stops` (the first
/// listed wins a tie), the index after that stop, and which stop it was (`None`: end of text).
fn read_until<'t, 's>(
    text: &'t str,
    index: usize,
    stops: &[&'s str],
) -> (usize, &'t str, Option<&'s str>) {
    let rest = text.get(index..).unwrap_or("");
    let mut best: Option<(usize, &'s str)> = None;
    for &s in stops {
        if let Some(pos) = rest.find(s) {
            if best.is_none_or(|(p, _)| pos < p) {
                best = Some((pos, s));
            }
        }
    }
    match best {
        Some((pos, s)) => (index + pos + s.len(), &rest[..pos], Some(s)),
        None => (text.len(), rest, None),
    }
}

/// Official `parse_tool_calls`, starting right after `\n\n<｜DSML｜tool_calls`.
fn parse_tool_calls(text: &str, mut index: usize) -> Result<(usize, Vec<ParsedToolCall>)> {
    let invoke_open = format!("<{DSML}invoke");
    let invoke_close = format!("</{DSML}invoke");
    let param_open = format!("<{DSML}parameter");
    let param_close = format!("/{DSML}parameter");
    let block_close = format!("</{DSML}tool_calls>");

    let mut calls = Vec::new();
    while index < text.len() {
        let (next, between, stop) = read_until(text, index, &[&invoke_open, &block_close]);
        index = next;
        if between != ">\n" {
            return Err(format_err(format!(
                "tool calls: expected \">\\n\" but got {between:?}"
            )));
        }
        match stop {
            Some(s) if s == block_close => break,
            None => return Err(format_err("tool calls: missing closing tag")),
            Some(_) => {}
        }

        let (next, head, mut stop) = read_until(text, index, &[&param_open, &invoke_close]);
        index = next;
        let name = parse_invoke_name(head)?;

        let mut args: Vec<(String, String, bool)> = Vec::new();
        while stop.is_some_and(|s| s == param_open) {
            let (next, param, _) = read_until(text, index, &[&param_close]);
            index = next;
            let (pname, is_string, value) = parse_parameter(param)?;
            if args.iter().any(|(n, _, _)| *n == pname) {
                return Err(format_err(format!(
                    "tool call `{name}`: duplicate parameter `{pname}`"
                )));
            }
            args.push((pname, value, is_string));
            let (next, between, s) = read_until(text, index, &[&param_open, &invoke_close]);
            index = next;
            stop = s;
            if between != ">\n" {
                return Err(format_err(format!(
                    "tool call `{name}`: expected \">\\n\" after a parameter but got {between:?}"
                )));
            }
        }
        calls.push(ParsedToolCall {
            name,
            arguments: arguments_json(&args),
        });
    }
    Ok((index, calls))
}

/// `^\s*name="(.*?)">\n$` (Python `$` also matches before one final newline).
fn parse_invoke_name(head: &str) -> Result<String> {
    let bad = || format_err(format!("tool call: bad invoke tag {head:?}"));
    let rest = head.trim_start().strip_prefix("name=\"").ok_or_else(bad)?;
    let name = rest
        .strip_suffix("\">\n\n")
        .or_else(|| rest.strip_suffix("\">\n"))
        .ok_or_else(bad)?;
    Ok(name.to_owned())
}

/// `^ name="(.*?)" string="(true|false)">(.*?)<$` → (name, is_string, value).
fn parse_parameter(param: &str) -> Result<(String, bool, String)> {
    let bad = || format_err(format!("tool call: bad parameter {param:?}"));
    let rest = param.strip_prefix(" name=\"").ok_or_else(bad)?;
    let body = rest
        .strip_suffix('<')
        .or_else(|| rest.strip_suffix("<\n"))
        .ok_or_else(bad)?;
    // The lazy name ends at the first `" string="true|false">`.
    let t = body.find("\" string=\"true\">");
    let f = body.find("\" string=\"false\">");
    let (pos, is_string) = match (t, f) {
        (Some(t), Some(f)) if f < t => (f, false),
        (Some(t), _) => (t, true),
        (None, Some(f)) => (f, false),
        (None, None) => return Err(bad()),
    };
    let marker_len = if is_string {
        "\" string=\"true\">".len()
    } else {
        "\" string=\"false\">".len()
    };
    Ok((
        body[..pos].to_owned(),
        is_string,
        body[pos + marker_len..].to_owned(),
    ))
}

/// Official `decode_dsml_to_arguments`: `{"k": v, ...}` with string values JSON-quoted and other
/// values verbatim.
fn arguments_json(args: &[(String, String, bool)]) -> String {
    let parts: Vec<String> = args
        .iter()
        .map(|(k, v, is_string)| {
            let key = OrderedJson::String(k.clone()).to_python_json();
            if *is_string {
                format!("{key}: {}", OrderedJson::String(v.clone()).to_python_json())
            } else {
                format!("{key}: {v}")
            }
        })
        .collect();
    format!("{{{}}}", parts.join(", "))
}
