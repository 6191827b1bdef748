//! The DeepSeek-V4 chat format (MODEL.md §6): OpenAI-style messages → prompt text, and
//! completion text → reasoning / answer / tool calls.
//!
//! Written to reproduce the official `encoding/encoding_dsv4.py` of `deepseek-ai/DeepSeek-V4-*`
//! character for character; the tests compare against prompts produced by running it
//! (`testdata/gen_cases.py`). Internal features of that file that no OpenAI request can
//! express (quick-instruction `task` tokens, `response_format`, `wo_eos`, `context`) are left out.
//!
//! ```
//! use dsv4_core::chat::{encode_messages, Message, ThinkingMode};
//! let prompt = encode_messages(
//!     &[Message::system("Be brief."), Message::user("Hi")],
//!     &[],
//!     ThinkingMode::Chat,
//! )
//! .unwrap();
//! assert_eq!(prompt, "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜></think>");
//! ```

mod encode;
mod json;
mod parse;
pub mod tokens;
mod types;

pub use encode::{encode_messages, encode_messages_with, EncodeOptions, ThinkingMode};
pub use json::OrderedJson;
pub use parse::{parse_completion, ParsedMessage, ParsedToolCall};
pub use tokens::stop_token_ids;
pub use types::{
    parse_messages, parse_tools, Content, ContentPart, ExtraFields, FunctionCall, FunctionDef,
    Message, Role, Tool, ToolCall,
};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Checks that `tok` maps the format's special tokens to the ids this module assumes (a
/// checkpoint's own `tokenizer.json` could differ from the embedded one).
pub fn check_tokenizer(tok: &Tokenizer) -> Result<()> {
    use tokens::*;
    for (text, id) in [
        (BOS, BOS_ID),
        (EOS, EOS_ID),
        (USER, USER_ID),
        (ASSISTANT, ASSISTANT_ID),
        (THINK_START, THINK_START_ID),
        (THINK_END, THINK_END_ID),
        (DSML, DSML_ID),
        (LATEST_REMINDER, LATEST_REMINDER_ID),
    ] {
        match tok.token_id(text) {
            Some(got) if got == id => {}
            got => {
                return Err(Error::Tokenizer(format!(
                    "special token {text:?} has id {got:?}, expected {id} (not a DeepSeek-V4 \
                     tokenizer?)"
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
