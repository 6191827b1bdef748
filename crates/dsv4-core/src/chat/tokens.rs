//! Special-token texts, ids and fixed prompt paragraphs of the DeepSeek-V4 chat format
//! (MODEL.md §6; texts from the official `encoding/encoding_dsv4.py`).

/// Beginning of the prompt (id 0).
pub const BOS: &str = "<｜begin▁of▁sentence｜>";
/// End of every assistant turn (id 1); generation stops on it.
pub const EOS: &str = "<｜end▁of▁sentence｜>";
/// Opens a user (or developer) turn.
pub const USER: &str = "<｜User｜>";
/// Opens an assistant turn.
pub const ASSISTANT: &str = "<｜Assistant｜>";
/// Opens a latest-reminder message.
pub const LATEST_REMINDER: &str = "<｜latest_reminder｜>";
/// Start of reasoning.
pub const THINK_START: &str = "<think>";
/// End of reasoning; also opens a non-thinking assistant turn.
pub const THINK_END: &str = "</think>";
/// Prefix of the DSML tool-call tags (`<｜DSML｜tool_calls>`, …).
pub const DSML: &str = "｜DSML｜";

/// Id of [`BOS`].
pub const BOS_ID: u32 = 0;
/// Id of [`EOS`].
pub const EOS_ID: u32 = 1;
/// Id of [`USER`].
pub const USER_ID: u32 = 128803;
/// Id of [`ASSISTANT`].
pub const ASSISTANT_ID: u32 = 128804;
/// Id of [`THINK_START`].
pub const THINK_START_ID: u32 = 128821;
/// Id of [`THINK_END`].
pub const THINK_END_ID: u32 = 128822;
/// Id of [`DSML`].
pub const DSML_ID: u32 = 128825;
/// Id of [`LATEST_REMINDER`].
pub const LATEST_REMINDER_ID: u32 = 128828;

/// Official `REASONING_EFFORT_MAX`, written at the very start of the prompt (after BOS) when
/// thinking with `reasoning_effort="max"`.
pub const REASONING_EFFORT_MAX: &str = "Reasoning Effort: Absolute maximum with no shortcuts \
permitted.\nYou MUST be very thorough in your thinking and comprehensively decompose the problem \
to resolve the root cause, rigorously stress-testing your logic against all potential paths, \
edge cases, and adversarial scenarios.\nExplicitly write out your entire deliberation process, \
documenting every intermediate step, considered alternative, and rejected hypothesis to ensure \
absolutely no assumption is left unchecked.\n\n";

/// Official `TOOLS_TEMPLATE` with its token placeholders filled in; `{tool_schemas}` is replaced
/// by one JSON line per tool.
pub const TOOLS_TEMPLATE: &str = "## Tools\n\nYou have access to a set of tools to help answer \
the user's question. You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the \
following:\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"$TOOL_NAME\">\n<｜DSML｜parameter \
name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n...\n\
</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n\
</｜DSML｜tool_calls>\n\nString parameters should be specified as is and set `string=\"true\"`. \
For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set \
`string=\"false\"`.\n\nIf thinking_mode is enabled (triggered by <think>), you MUST output your \
complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\n\
Otherwise, output directly after </think> with tool calls or final response.\n\n### Available \
Tool Schemas\n\n{tool_schemas}\n\nYou MUST strictly follow the above defined tool name and \
parameter schemas to invoke tool calls.\n";

/// The ids that end generation: EOS only (the V4 encoder does not use `<|EOT|>`).
pub fn stop_token_ids() -> &'static [u32] {
    &[EOS_ID]
}
