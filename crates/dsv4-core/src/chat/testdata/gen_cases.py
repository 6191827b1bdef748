"""Generates cases.json: expected DeepSeek-V4 prompts and parses from the official encoder.

Usage: python gen_cases.py /path/to/dir/with/encoding_dsv4.py > cases.json

The reference is `encoding/encoding_dsv4.py` of the DeepSeek-V4 release (the copy used was the
one vendored in github.com/supermy/ds4rs at commit 2ecc534c, which passes the four golden tests
shipped beside it in `encoding/tests/`). Request-level tools are attached the way vLLM's
DeepSeek-V4 tokenizer does: onto messages[0] if it is a system message, else onto a new empty
system message inserted first.
"""

import copy
import json
import sys

sys.path.insert(0, sys.argv[1])
from encoding_dsv4 import encode_messages, parse_message_from_completion_text  # noqa: E402

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. 北京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Web search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "top_k": {"type": "integer", "minimum": 1, "default": 5},
                "filters": {"type": "object", "properties": {"site": {"type": "string"}}},
                "threshold": {"type": "number", "default": 1e-05},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}

MODES = {
    "chat": dict(thinking_mode="chat"),
    "thinking": dict(thinking_mode="thinking"),
    "max": dict(thinking_mode="thinking", reasoning_effort="max"),
}

ENCODE_CASES = [
    ("chat_single_turn", "chat", [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ], []),
    ("thinking_single_turn", "thinking", [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ], []),
    ("max_effort_no_system", "max", [
        {"role": "user", "content": "Prove that √2 is irrational."},
    ], []),
    ("thinking_multi_turn_drops_past_reasoning", "thinking", [
        {"role": "system", "content": "Be concise."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "reasoning_content": "Greet back.", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "reasoning_content": "It is Paris.", "content": "Paris."},
        {"role": "user", "content": "And of Japan?"},
    ], []),
    ("chat_multi_turn", "chat", [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "reasoning_content": "ignored in chat mode", "content": "Hi!"},
        {"role": "user", "content": "Bye"},
    ], []),
    ("thinking_ends_with_assistant", "thinking", [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "reasoning_content": "Old.", "content": "Hi!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "Add.", "content": "4"},
    ], []),
    ("tools_thinking_parallel_calls_results_reordered", "thinking", [
        {"role": "system", "content": "You can use tools."},
        {"role": "user", "content": "Weather in Paris and news about it?"},
        {"role": "assistant", "content": "", "reasoning_content": "Two calls needed.",
         "tool_calls": [
             {"id": "call_a", "type": "function", "function": {
                 "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}},
             {"id": "call_b", "type": "function", "function": {
                 "name": "search",
                 "arguments": "{\"query\": \"Paris \\\"news\\\"\\n today\", \"top_k\": 3, "
                              "\"filters\": {\"site\": \"lemonde.fr\", \"lang\": [\"fr\", \"en\"]}, "
                              "\"threshold\": 0.25, \"strict\": true, \"extra\": null}"}},
         ]},
        {"role": "tool", "tool_call_id": "call_b", "content": "[{\"title\": \"Nouvelles\"}]"},
        {"role": "tool", "tool_call_id": "call_a", "content": "{\"temp\": 18}"},
    ], [WEATHER, SEARCH]),
    ("tools_history_keeps_reasoning_then_user", "thinking", [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "reasoning_content": "Call the tool.", "content": "Let me check.",
         "tool_calls": [{"id": "c1", "type": "function", "function": {
             "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "reasoning_content": "Report.", "content": "Sunny in Rome."},
        {"role": "user", "content": "Thanks! And tomorrow?"},
    ], [WEATHER]),
    ("tools_no_system_chat", "chat", [
        {"role": "user", "content": "Search for rust tokenizers"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "x", "type": "function",
         "function": {"name": "search", "arguments": "not json {"}}]},
        {"role": "tool", "tool_call_id": "x", "content": [
            {"type": "text", "text": "result one"}, {"type": "image_url"},
            {"type": "text", "text": "result two"}]},
        {"role": "user", "content": "Summarize."},
    ], [SEARCH]),
    ("tools_max_effort", "max", [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
    ], [WEATHER]),
    ("developer_dropped_before_last_user", "thinking", [
        {"role": "system", "content": "sys"},
        {"role": "developer", "content": "dev instructions"},
        {"role": "assistant", "reasoning_content": "r0", "content": "a0"},
        {"role": "user", "content": "u1"},
    ], []),
    ("developer_last_chat", "chat", [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "u0"},
        {"role": "assistant", "content": "a0"},
        {"role": "developer", "content": "dev says hi"},
    ], []),
    ("latest_reminder_and_merged_users", "thinking", [
        {"role": "system", "content": "该助手为DeepSeek。"},
        {"role": "latest_reminder", "content": "2026-01-01, Paris, fr"},
        {"role": "user", "content": "first part"},
        {"role": "user", "content": "second part"},
    ], []),
    ("user_then_latest_reminder", "chat", [
        {"role": "user", "content": "hi"},
        {"role": "latest_reminder", "content": "today"},
    ], []),
    ("drop_thinking_with_tool_messages_no_tools", "thinking", [
        {"role": "user", "content": "u0"},
        {"role": "assistant", "reasoning_content": "r0", "content": "",
         "tool_calls": [{"id": "t0", "type": "function",
                         "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t0", "content": "out"},
    ], []),
]

# Completions to parse: (name, mode, text)
PARSE_CASES = [
    ("chat_plain", "chat", "Hello there!<｜end▁of▁sentence｜>"),
    ("thinking_plain", "thinking", "Simple arithmetic.</think>2 + 2 = 4.<｜end▁of▁sentence｜>"),
    ("max_plain_multiline", "max", "Step 1\nStep 2\n</think>\n\nDone: 42<｜end▁of▁sentence｜>"),
    ("thinking_tool_call", "thinking",
     "Need weather.</think>Checking.\n\n<｜DSML｜tool_calls>\n"
     "<｜DSML｜invoke name=\"get_weather\">\n"
     "<｜DSML｜parameter name=\"city\" string=\"true\">São \"Paulo\"\n</｜DSML｜parameter>\n"
     "<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n"
     "<｜DSML｜parameter name=\"opts\" string=\"false\">{\"a\": [1, 2.5]}</｜DSML｜parameter>\n"
     "</｜DSML｜invoke>\n"
     "<｜DSML｜invoke name=\"noop\">\n"
     "</｜DSML｜invoke>\n"
     "</｜DSML｜tool_calls><｜end▁of▁sentence｜>"),
    ("chat_tool_call", "chat",
     "\n\n<｜DSML｜tool_calls>\n"
     "<｜DSML｜invoke name=\"search\">\n"
     "<｜DSML｜parameter name=\"query\" string=\"true\">rust</｜DSML｜parameter>\n"
     "</｜DSML｜invoke>\n"
     "</｜DSML｜tool_calls><｜end▁of▁sentence｜>"),
]


def main():
    out = {"encode": [], "parse": []}
    for name, mode, messages, tools in ENCODE_CASES:
        msgs = copy.deepcopy(messages)
        if tools:
            if msgs and msgs[0].get("role") == "system":
                msgs[0] = dict(msgs[0])
            else:
                msgs.insert(0, {"role": "system"})
            msgs[0]["tools"] = copy.deepcopy(tools)
        prompt = encode_messages(msgs, **MODES[mode])
        out["encode"].append({"name": name, "mode": mode, "messages": messages, "tools": tools,
                              "expected": prompt})
    for name, mode, text in PARSE_CASES:
        parsed = parse_message_from_completion_text(text, MODES[mode]["thinking_mode"])
        out["parse"].append({
            "name": name, "mode": mode, "text": text,
            "reasoning_content": parsed["reasoning_content"],
            "content": parsed["content"],
            "tool_calls": [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                           for c in parsed["tool_calls"]],
        })
    json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
