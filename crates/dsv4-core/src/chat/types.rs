//! OpenAI-style chat messages and tool definitions (serde), as accepted by the V4 encoder.

use serde::{Deserialize, Serialize};

use super::json::OrderedJson;
use crate::error::{Error, Result};

/// Who wrote a message. `developer` and `latest_reminder` are DeepSeek extensions used by the
/// official encoder (a developer message renders like a user turn; a latest reminder carries
/// e.g. date and locale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
    Developer,
    Tool,
    LatestReminder,
}

/// Message content: a string or an array of content parts (OpenAI multi-part form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part content array. Only `text` parts carry text for this model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Content {
    /// The text, with parts joined by a blank line and non-text parts written as
    /// `[Unsupported {type}]` (the official encoder's rule for tool results).
    pub fn flatten(&self) -> String {
        match self {
            Content::Text(s) => s.clone(),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => t.clone(),
                    ("text", None) => String::new(),
                    (other, _) => format!("[Unsupported {other}]"),
                })
                .collect::<Vec<_>>()
                .join("\n\n"),
        }
    }
}

impl From<&str> for Content {
    fn from(s: &str) -> Self {
        Content::Text(s.to_owned())
    }
}

impl From<String> for Content {
    fn from(s: String) -> Self {
        Content::Text(s)
    }
}

/// A past tool call of an assistant message (OpenAI shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Always `"function"`.
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
}

/// The function part of a tool call: a name and its arguments as a JSON object text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

fn function_kind() -> String {
    "function".to_owned()
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant turn's reasoning (the text between `<think>` and `</think>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// For `role: tool`: the id of the call this message answers (orders the results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tools attached to a `system` or `developer` message (the official encoder's own field;
    /// OpenAI clients pass tools beside the messages instead, see `encode_messages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
}

impl Message {
    /// A message with text content and nothing else.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(Content::Text(content.into())),
            reasoning_content: None,
            tool_calls: None,
            tool_call_id: None,
            name: None,
            tools: None,
        }
    }

    /// `role: system` with `content`.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// `role: user` with `content`.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// `role: assistant` with `content`.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// `role: tool` answering call `tool_call_id`.
    pub fn tool(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(tool_call_id.into()),
            ..Self::new(Role::Tool, content)
        }
    }

    /// The content as text (`None` → empty).
    pub fn text(&self) -> String {
        self.content
            .as_ref()
            .map(Content::flatten)
            .unwrap_or_default()
    }
}

/// Parses a JSON array of messages, turning serde errors (unknown role, wrong shape) into
/// [`Error::Chat`].
pub fn parse_messages(json: &str) -> Result<Vec<Message>> {
    serde_json::from_str(json).map_err(|e| Error::Chat(format!("invalid messages JSON: {e}")))
}

/// Parses a JSON array of tool definitions into [`Tool`]s.
pub fn parse_tools(json: &str) -> Result<Vec<Tool>> {
    serde_json::from_str(json).map_err(|e| Error::Chat(format!("invalid tools JSON: {e}")))
}

/// A tool the model may call (OpenAI `{"type": "function", "function": {...}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// Always `"function"`.
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionDef,
}

/// A function definition. Rendered into the prompt as one JSON line with keys in the order
/// name, description, parameters, then any other keys as given; `parameters` keeps its own key
/// order (it is what the model reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<OrderedJson>,
    /// Other keys (e.g. `strict`), in source order.
    #[serde(flatten)]
    pub extra: ExtraFields,
}

/// Unknown object keys kept in order (see [`FunctionDef::extra`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExtraFields(pub Vec<(String, OrderedJson)>);

impl Serialize for ExtraFields {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for ExtraFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match OrderedJson::deserialize(d)? {
            OrderedJson::Object(entries) => Ok(ExtraFields(entries)),
            OrderedJson::Null => Ok(ExtraFields::default()),
            _ => Err(serde::de::Error::custom("expected an object")),
        }
    }
}

impl Tool {
    /// A function tool; `parameters` is a JSON Schema object given as JSON text.
    pub fn function(name: &str, description: &str, parameters_json: &str) -> Result<Self> {
        let parameters = OrderedJson::parse(parameters_json)
            .map_err(|e| Error::Chat(format!("tool `{name}`: parameters are not JSON: {e}")))?;
        Ok(Self {
            kind: function_kind(),
            function: FunctionDef {
                name: name.to_owned(),
                description: Some(description.to_owned()),
                parameters: Some(parameters),
                extra: ExtraFields::default(),
            },
        })
    }

    /// The function object as the official `to_json` writes it into the prompt.
    pub(crate) fn schema_json(&self) -> String {
        let f = &self.function;
        let mut entries = vec![("name".to_owned(), OrderedJson::String(f.name.clone()))];
        if let Some(d) = &f.description {
            entries.push(("description".to_owned(), OrderedJson::String(d.clone())));
        }
        if let Some(p) = &f.parameters {
            entries.push(("parameters".to_owned(), p.clone()));
        }
        entries.extend(f.extra.0.iter().cloned());
        OrderedJson::Object(entries).to_python_json()
    }
}
