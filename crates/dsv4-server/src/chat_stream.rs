//! Splits a chat completion into reasoning, answer and tool calls while it streams: text before
//! `</think>` is reasoning (thinking modes), then answer text until a DSML tool-call block starts;
//! the block is parsed into tool calls when the completion ends. A tail that could still turn
//! into one of those markers is held back until it is decided.

use dsv4_core::chat::{
    parse_completion, tokens::DSML, tokens::THINK_END, ParsedToolCall, ThinkingMode,
};

/// Text released by one push, by section.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Reasoning,
    Content,
    ToolCalls,
}

/// The streaming splitter of one choice.
pub struct ChatSplitter {
    mode: ThinkingMode,
    section: Section,
    /// Undecided text of the current section.
    held: String,
    /// The tool-call block so far.
    tool_text: String,
    /// Everything pushed (for the final parse of the tool calls).
    full: String,
    tool_start: String,
}

impl ChatSplitter {
    pub fn new(mode: ThinkingMode) -> Self {
        ChatSplitter {
            mode,
            section: if mode.is_thinking() {
                Section::Reasoning
            } else {
                Section::Content
            },
            held: String::new(),
            tool_text: String::new(),
            full: String::new(),
            tool_start: format!("\n\n<{DSML}tool_calls"),
        }
    }

    pub fn push(&mut self, text: &str) -> Delta {
        self.full.push_str(text);
        self.held.push_str(text);
        let mut d = Delta::default();
        loop {
            match self.section {
                Section::Reasoning => match self.held.find(THINK_END) {
                    Some(pos) => {
                        d.reasoning.push_str(&self.held[..pos]);
                        self.held.drain(..pos + THINK_END.len());
                        self.section = Section::Content;
                    }
                    None => {
                        let keep = partial_suffix(&self.held, THINK_END);
                        d.reasoning.extend(self.held.drain(..keep));
                        return d;
                    }
                },
                Section::Content => match self.held.find(&self.tool_start) {
                    Some(pos) => {
                        d.content.push_str(&self.held[..pos]);
                        self.tool_text.extend(self.held.drain(..));
                        self.section = Section::ToolCalls;
                    }
                    None => {
                        let keep = partial_suffix(&self.held, &self.tool_start);
                        d.content.extend(self.held.drain(..keep));
                        return d;
                    }
                },
                Section::ToolCalls => {
                    self.tool_text.extend(self.held.drain(..));
                    return d;
                }
            }
        }
    }

    /// Ends the completion: releases held text and parses the tool-call block. A block that
    /// does not parse is returned as answer text rather than lost.
    pub fn finish(&mut self) -> (Delta, Vec<ParsedToolCall>) {
        let mut d = Delta::default();
        let held = std::mem::take(&mut self.held);
        match self.section {
            Section::Reasoning => d.reasoning = held,
            Section::Content => d.content = held,
            Section::ToolCalls => {
                self.tool_text.push_str(&held);
                match parse_completion(&self.full, self.mode) {
                    Ok(m) if !m.tool_calls.is_empty() => return (d, m.tool_calls),
                    _ => d.content = std::mem::take(&mut self.tool_text),
                }
            }
        }
        (d, Vec::new())
    }
}

/// Start (byte index) of the longest suffix of `text` that is a proper prefix of `marker`
/// (`text.len()` when none): the part that must wait for more text.
fn partial_suffix(text: &str, marker: &str) -> usize {
    let start = text.len().saturating_sub(marker.len() - 1);
    (start..text.len())
        .filter(|&i| text.is_char_boundary(i))
        .find(|&i| marker.starts_with(&text[i..]))
        .unwrap_or(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: ThinkingMode, text: &str, piece: usize) -> (String, String, Vec<ParsedToolCall>) {
        let mut s = ChatSplitter::new(mode);
        let (mut r, mut c) = (String::new(), String::new());
        let chars: Vec<char> = text.chars().collect();
        for ch in chars.chunks(piece) {
            let d = s.push(&ch.iter().collect::<String>());
            r += &d.reasoning;
            c += &d.content;
        }
        let (d, calls) = s.finish();
        (r + &d.reasoning, c + &d.content, calls)
    }

    const CALL: &str = "Let me check.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

    #[test]
    fn splits_reasoning_content_and_tool_calls_at_any_piece_size() {
        for piece in [1, 2, 3, 7, 1000] {
            let text = format!("hmm, weather</think>{CALL}");
            let (r, c, calls) = run(ThinkingMode::Thinking, &text, piece);
            assert_eq!(r, "hmm, weather", "piece {piece}");
            assert_eq!(c, "Let me check.", "piece {piece}");
            assert_eq!(calls.len(), 1);
            assert_eq!(calls[0].name, "get_weather");
            let args: serde_json::Value = serde_json::from_str(&calls[0].arguments).unwrap();
            assert_eq!(args, serde_json::json!({"city": "Paris", "days": 3}));
        }
    }

    #[test]
    fn chat_mode_has_no_reasoning_and_keeps_near_markers() {
        let (r, c, calls) = run(ThinkingMode::Chat, "a </thin b\n\n<x", 1);
        assert_eq!(
            (r.as_str(), c.as_str(), calls.len()),
            ("", "a </thin b\n\n<x", 0)
        );
    }

    #[test]
    fn broken_tool_block_is_returned_as_content() {
        let text = "ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=";
        let (_, c, calls) = run(ThinkingMode::Chat, text, 4);
        assert!(calls.is_empty());
        assert_eq!(c, text);
    }

    #[test]
    fn unfinished_reasoning_stays_reasoning() {
        let (r, c, _) = run(ThinkingMode::Thinking, "still thinking </thi", 3);
        assert_eq!((r.as_str(), c.as_str()), ("still thinking </thi", ""));
    }
}
