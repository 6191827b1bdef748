//! Messages → DeepSeek-V4 prompt text, following the official `encoding/encoding_dsv4.py`
//! (`encode_messages`, `merge_tool_messages`, `sort_tool_results_by_call_order`,
//! `_drop_thinking_messages`, `render_message`, `render_tools`).
//!
//! Pipeline: validate → attach request-level tools → merge `tool` messages into user turns →
//! order tool results by call order → (thinking mode) drop past reasoning → render each turn.

use std::collections::HashMap;

use super::json::OrderedJson;
use super::tokens::{
    ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, REASONING_EFFORT_MAX, THINK_END, THINK_START,
    TOOLS_TEMPLATE, USER,
};
use super::types::{Message, Role, Tool, ToolCall};
use crate::error::{Error, Result};

/// How the model should answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThinkingMode {
    /// Non-thinking: the assistant turn opens with `</think>` and the model answers directly.
    Chat,
    /// Thinking: the last assistant turn opens with `<think>`; the model reasons first.
    #[default]
    Thinking,
    /// Thinking with `reasoning_effort="max"`: as `Thinking`, plus the official max-effort
    /// instruction paragraph at the very start of the prompt.
    ThinkingMax,
}

impl ThinkingMode {
    /// True for the modes in which the model writes reasoning before `</think>`.
    pub fn is_thinking(self) -> bool {
        !matches!(self, ThinkingMode::Chat)
    }
}

impl std::str::FromStr for ThinkingMode {
    type Err = Error;
    /// `chat` (or `none`), `thinking` (or `high`), `max`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "chat" | "none" | "non-thinking" => Ok(ThinkingMode::Chat),
            "thinking" | "high" => Ok(ThinkingMode::Thinking),
            "max" | "thinking-max" => Ok(ThinkingMode::ThinkingMax),
            other => Err(Error::Chat(format!(
                "unknown thinking mode `{other}` (expected chat, thinking or max)"
            ))),
        }
    }
}

/// Options of [`encode_messages_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    pub mode: ThinkingMode,
    /// Drop the reasoning of assistant turns before the last user message (official default
    /// `true`; forced off when any tools are defined).
    pub drop_thinking: bool,
}

impl EncodeOptions {
    /// `mode` with the official default `drop_thinking = true`.
    pub fn new(mode: ThinkingMode) -> Self {
        Self {
            mode,
            drop_thinking: true,
        }
    }
}

/// Renders a conversation into the exact DeepSeek-V4 prompt text, BOS included.
///
/// When the last message is a user, developer or tool message, the prompt ends with the
/// assistant transition (`<｜Assistant｜><think>` or `<｜Assistant｜></think>`) for generation.
/// Request-level `tools` are attached to the first message if it is a system message, else to a
/// new empty system message inserted first (as vLLM's DeepSeek-V4 tokenizer does; the official
/// encoder itself only reads `tools` from system/developer messages).
pub fn encode_messages(messages: &[Message], tools: &[Tool], mode: ThinkingMode) -> Result<String> {
    encode_messages_with(messages, tools, EncodeOptions::new(mode))
}

/// [`encode_messages`] with explicit options.
pub fn encode_messages_with(
    messages: &[Message],
    tools: &[Tool],
    opts: EncodeOptions,
) -> Result<String> {
    validate(messages)?;
    let has_tools = !tools.is_empty()
        || messages
            .iter()
            .any(|m| m.tools.as_ref().is_some_and(|t| !t.is_empty()));
    let drop_thinking = opts.drop_thinking && !has_tools;

    let mut turns = merge_tool_messages(messages, tools);
    sort_tool_results_by_call_order(&mut turns);
    if opts.mode.is_thinking() && drop_thinking {
        turns = drop_past_thinking(turns);
    }

    let mut prompt = String::from(BOS);
    let last_user = last_user_index(&turns);
    for i in 0..turns.len() {
        render_turn(&mut prompt, &turns, i, last_user, opts.mode, drop_thinking)?;
    }
    Ok(prompt)
}

/// Rejects conversations the official encoder cannot render (or renders into nonsense).
fn validate(messages: &[Message]) -> Result<()> {
    if messages.is_empty() {
        return Err(Error::Chat("the message list is empty".into()));
    }
    let mut last_assistant_called = false;
    for (i, m) in messages.iter().enumerate() {
        match m.role {
            Role::Assistant => {
                last_assistant_called = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
            }
            Role::Tool if !last_assistant_called => {
                return Err(Error::Chat(format!(
                    "messages[{i}]: a `tool` message must follow an assistant message with \
                     `tool_calls`"
                )));
            }
            Role::Developer if m.text().is_empty() => {
                return Err(Error::Chat(format!(
                    "messages[{i}]: a `developer` message needs non-empty content"
                )));
            }
            Role::LatestReminder if m.content.is_none() => {
                return Err(Error::Chat(format!(
                    "messages[{i}]: a `latest_reminder` message needs content"
                )));
            }
            _ => {}
        }
        if m.role != Role::Assistant && m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(Error::Chat(format!(
                "messages[{i}]: only assistant messages can have `tool_calls`"
            )));
        }
    }
    Ok(())
}

/// A piece of a user turn after merging.
#[derive(Debug, Clone)]
enum Block {
    Text(String),
    ToolResult { call_id: String, content: String },
}

/// A message after preprocessing. `Role::Tool` never occurs (merged into user turns).
#[derive(Debug, Clone)]
struct Turn<'a> {
    /// Index in the caller's list, for error messages (`None` for the inserted system turn).
    source: Option<usize>,
    role: Role,
    /// Content of non-user turns.
    text: String,
    /// Content of user turns.
    blocks: Vec<Block>,
    reasoning: Option<&'a str>,
    tool_calls: &'a [ToolCall],
    tools: &'a [Tool],
}

impl<'a> Turn<'a> {
    fn from_message(i: usize, m: &'a Message) -> Self {
        Self {
            source: Some(i),
            role: m.role,
            text: m.text(),
            blocks: Vec::new(),
            reasoning: m.reasoning_content.as_deref(),
            tool_calls: m.tool_calls.as_deref().unwrap_or(&[]),
            tools: m.tools.as_deref().unwrap_or(&[]),
        }
    }
}

/// Official `merge_tool_messages`: every `tool` message becomes a `<tool_result>` block of a
/// user turn, and consecutive user messages / tool results share one user turn.
fn merge_tool_messages<'a>(messages: &'a [Message], tools: &'a [Tool]) -> Vec<Turn<'a>> {
    let mut turns: Vec<Turn<'a>> = Vec::with_capacity(messages.len() + 1);
    for (i, m) in messages.iter().enumerate() {
        let block = match m.role {
            Role::Tool => Block::ToolResult {
                call_id: m.tool_call_id.clone().unwrap_or_default(),
                content: m.text(),
            },
            Role::User => Block::Text(m.text()),
            _ => {
                turns.push(Turn::from_message(i, m));
                continue;
            }
        };
        match turns.last_mut() {
            Some(last) if last.role == Role::User => last.blocks.push(block),
            _ => {
                let mut turn = Turn::from_message(i, m);
                turn.role = Role::User;
                turn.blocks.push(block);
                turns.push(turn);
            }
        }
    }
    if !tools.is_empty() {
        match turns.first_mut() {
            Some(first) if first.role == Role::System => first.tools = tools,
            _ => turns.insert(
                0,
                Turn {
                    source: None,
                    role: Role::System,
                    text: String::new(),
                    blocks: Vec::new(),
                    reasoning: None,
                    tool_calls: &[],
                    tools,
                },
            ),
        }
    }
    turns
}

/// Official `sort_tool_results_by_call_order`: within a user turn, tool results follow the
/// order of the calls of the latest assistant message with calls (unknown ids sort first).
fn sort_tool_results_by_call_order(turns: &mut [Turn<'_>]) {
    let mut order: HashMap<&str, usize> = HashMap::new();
    for turn in turns.iter_mut() {
        match turn.role {
            Role::Assistant if !turn.tool_calls.is_empty() => {
                order.clear();
                for (idx, call) in turn.tool_calls.iter().enumerate() {
                    if let Some(id) = call.id.as_deref().filter(|id| !id.is_empty()) {
                        order.insert(id, idx);
                    }
                }
            }
            Role::User => {
                let n_results = turn
                    .blocks
                    .iter()
                    .filter(|b| matches!(b, Block::ToolResult { .. }))
                    .count();
                if n_results < 2 || order.is_empty() {
                    continue;
                }
                let mut results: Vec<Block> = turn
                    .blocks
                    .iter()
                    .filter(|b| matches!(b, Block::ToolResult { .. }))
                    .cloned()
                    .collect();
                results.sort_by_key(|b| match b {
                    Block::ToolResult { call_id, .. } => {
                        order.get(call_id.as_str()).copied().unwrap_or(0)
                    }
                    Block::Text(_) => 0,
                });
                let mut sorted = results.into_iter();
                for b in turn.blocks.iter_mut() {
                    if matches!(b, Block::ToolResult { .. }) {
                        if let Some(next) = sorted.next() {
                            *b = next;
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Index of the last user or developer turn.
fn last_user_index(turns: &[Turn<'_>]) -> Option<usize> {
    turns
        .iter()
        .rposition(|t| matches!(t.role, Role::User | Role::Developer))
}

/// Official `_drop_thinking_messages`: before the last user turn, assistant turns lose their
/// reasoning and developer turns are removed.
fn drop_past_thinking(turns: Vec<Turn<'_>>) -> Vec<Turn<'_>> {
    let Some(last_user) = last_user_index(&turns) else {
        return turns;
    };
    turns
        .into_iter()
        .enumerate()
        .filter_map(|(i, mut t)| {
            if i >= last_user {
                return Some(t);
            }
            match t.role {
                Role::User | Role::System | Role::LatestReminder | Role::Tool => Some(t),
                Role::Assistant => {
                    t.reasoning = None;
                    Some(t)
                }
                Role::Developer => None,
            }
        })
        .collect()
}

/// Official `render_message` for `turns[i]`, appended to `out`.
fn render_turn(
    out: &mut String,
    turns: &[Turn<'_>],
    i: usize,
    last_user: Option<usize>,
    mode: ThinkingMode,
    drop_thinking: bool,
) -> Result<()> {
    let turn = &turns[i];
    let thinking = mode.is_thinking();
    // Only turns after the last user turn count as "current" (`index > last_user_idx`).
    let after_last_user = last_user.is_none_or(|u| i > u);

    if i == 0 && mode == ThinkingMode::ThinkingMax {
        out.push_str(REASONING_EFFORT_MAX);
    }

    match turn.role {
        Role::System => {
            out.push_str(&turn.text);
            push_tools(out, turn.tools);
        }
        Role::Developer => {
            out.push_str(USER);
            out.push_str(&turn.text);
            push_tools(out, turn.tools);
        }
        Role::User => {
            out.push_str(USER);
            for (k, block) in turn.blocks.iter().enumerate() {
                if k > 0 {
                    out.push_str("\n\n");
                }
                match block {
                    Block::Text(t) => out.push_str(t),
                    Block::ToolResult { content, .. } => {
                        out.push_str("<tool_result>");
                        out.push_str(content);
                        out.push_str("</tool_result>");
                    }
                }
            }
        }
        Role::LatestReminder => {
            out.push_str(LATEST_REMINDER);
            out.push_str(&turn.text);
        }
        Role::Assistant => {
            if thinking && (!drop_thinking || after_last_user) {
                out.push_str(turn.reasoning.unwrap_or(""));
                out.push_str(THINK_END);
            }
            out.push_str(&turn.text);
            if !turn.tool_calls.is_empty() {
                push_tool_calls(out, turn.tool_calls, turn.source)?;
            }
            out.push_str(EOS);
        }
        // Merged away by `merge_tool_messages`.
        Role::Tool => {}
    }

    // The assistant transition, only after a user/developer turn that is the last one or is
    // followed by an assistant or latest-reminder turn.
    let next_role = turns.get(i + 1).map(|t| t.role);
    let followed_by_answer = matches!(
        next_role,
        None | Some(Role::Assistant) | Some(Role::LatestReminder)
    );
    if followed_by_answer && matches!(turn.role, Role::User | Role::Developer) {
        out.push_str(ASSISTANT);
        let current = last_user.is_some_and(|u| i >= u);
        if thinking && (!drop_thinking || current) {
            out.push_str(THINK_START);
        } else {
            out.push_str(THINK_END);
        }
    }
    Ok(())
}

/// Official `render_tools`, after a blank line.
fn push_tools(out: &mut String, tools: &[Tool]) {
    if tools.is_empty() {
        return;
    }
    let schemas: Vec<String> = tools.iter().map(Tool::schema_json).collect();
    out.push_str("\n\n");
    out.push_str(&TOOLS_TEMPLATE.replace("{tool_schemas}", &schemas.join("\n")));
}

/// The DSML block of an assistant's past tool calls (official `tool_calls_template`,
/// `encode_arguments_to_dsml`).
fn push_tool_calls(out: &mut String, calls: &[ToolCall], source: Option<usize>) -> Result<()> {
    out.push_str("\n\n<");
    out.push_str(DSML);
    out.push_str("tool_calls>\n");
    for (j, call) in calls.iter().enumerate() {
        if j > 0 {
            out.push('\n');
        }
        out.push_str(&format!("<{DSML}invoke name=\"{}\">\n", call.function.name));
        let params = dsml_parameters(&call.function.arguments).ok_or_else(|| {
            Error::Chat(format!(
                "messages[{}].tool_calls[{j}]: arguments of `{}` must be a JSON object",
                source.map_or_else(|| "?".to_owned(), |s| s.to_string()),
                call.function.name
            ))
        })?;
        for (k, (name, value)) in params.iter().enumerate() {
            if k > 0 {
                out.push('\n');
            }
            let (is_str, text) = match value {
                OrderedJson::String(s) => ("true", s.clone()),
                other => ("false", other.to_python_json()),
            };
            out.push_str(&format!(
                "<{DSML}parameter name=\"{name}\" string=\"{is_str}\">{text}</{DSML}parameter>"
            ));
        }
        out.push_str(&format!("\n</{DSML}invoke>"));
    }
    out.push_str(&format!("\n</{DSML}tool_calls>"));
    Ok(())
}

/// The arguments as (name, value) pairs: a JSON object's entries in order, or, for text that is
/// not JSON at all, a single `arguments` string parameter (as the official encoder). `None` for
/// JSON that is not an object (the official encoder crashes on it).
fn dsml_parameters(arguments: &str) -> Option<Vec<(String, OrderedJson)>> {
    match OrderedJson::parse(arguments) {
        Ok(OrderedJson::Object(entries)) => Some(entries),
        Ok(_) => None,
        Err(_) => Some(vec![(
            "arguments".to_owned(),
            OrderedJson::String(arguments.to_owned()),
        )]),
    }
}
