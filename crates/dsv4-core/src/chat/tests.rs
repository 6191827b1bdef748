//! Tests against the official encoder's output. `testdata/cases.json` was produced by
//! `testdata/gen_cases.py` running the official `encoding_dsv4.py` (see that script's header).

use serde::Deserialize;

use super::*;
use crate::error::Error;

#[derive(Deserialize)]
struct Cases {
    encode: Vec<EncodeCase>,
    parse: Vec<ParseCase>,
}

#[derive(Deserialize)]
struct EncodeCase {
    name: String,
    mode: String,
    messages: Vec<Message>,
    tools: Vec<Tool>,
    expected: String,
}

#[derive(Deserialize)]
struct ParseCase {
    name: String,
    mode: String,
    text: String,
    reasoning_content: String,
    content: String,
    tool_calls: Vec<ExpectedCall>,
}

#[derive(Deserialize)]
struct ExpectedCall {
    name: String,
    arguments: String,
}

fn cases() -> Cases {
    serde_json::from_str(include_str!("testdata/cases.json")).expect("cases.json parses")
}

#[test]
fn encode_matches_official_encoder() {
    let cases = cases();
    assert!(cases.encode.len() >= 10);
    for case in cases.encode {
        let mode: ThinkingMode = case.mode.parse().unwrap();
        let got = encode_messages(&case.messages, &case.tools, mode)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(got, case.expected, "case {}", case.name);
    }
}

#[test]
fn parse_matches_official_parser() {
    for case in cases().parse {
        let mode: ThinkingMode = case.mode.parse().unwrap();
        let got =
            parse_completion(&case.text, mode).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        // The official parser returns "" for reasoning in chat mode.
        assert_eq!(
            got.reasoning_content.as_deref().unwrap_or(""),
            case.reasoning_content,
            "{}",
            case.name
        );
        assert_eq!(got.reasoning_content.is_some(), mode.is_thinking());
        assert_eq!(got.content, case.content, "{}", case.name);
        let calls: Vec<(String, String)> = got
            .tool_calls
            .iter()
            .map(|c| (c.name.clone(), c.arguments.clone()))
            .collect();
        let want: Vec<(String, String)> = case
            .tool_calls
            .into_iter()
            .map(|c| (c.name, c.arguments))
            .collect();
        assert_eq!(calls, want, "{}", case.name);
        // Without the EOS text (engine stopped on id 1) the result is the same.
        if let Some(stripped) = case.text.strip_suffix(tokens::EOS) {
            assert_eq!(
                parse_completion(stripped, mode).unwrap(),
                got,
                "{}",
                case.name
            );
        }
    }
}

#[test]
fn parsed_tool_call_arguments_are_json() {
    let text =
        "Need weather.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n\
                <｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n\
                <｜DSML｜parameter name=\"days\" string=\"false\">[1, 2]</｜DSML｜parameter>\n\
                </｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    let parsed = parse_completion(text, ThinkingMode::ThinkingMax).unwrap();
    assert_eq!(parsed.reasoning_content.as_deref(), Some("Need weather."));
    assert_eq!(parsed.content, "");
    assert_eq!(parsed.tool_calls.len(), 1);
    assert_eq!(
        parsed.tool_calls[0].arguments_json().unwrap(),
        serde_json::json!({"city": "Paris", "days": [1, 2]})
    );
    let call = parsed.tool_calls[0].to_tool_call("call_0");
    assert_eq!(call.id.as_deref(), Some("call_0"));
    assert_eq!(call.function.name, "get_weather");
}

#[test]
fn encode_then_parse_round_trips_a_tool_call() {
    // An assistant turn rendered by the encoder parses back to the same call.
    let tools = vec![Tool::function(
        "search",
        "Web search",
        r#"{"type":"object","properties":{"q":{"type":"string"},"n":{"type":"integer"}}}"#,
    )
    .unwrap()];
    let mut a = Message::assistant("Looking.");
    a.reasoning_content = Some("Search it.".into());
    a.tool_calls = Some(vec![ToolCall {
        id: Some("c".into()),
        kind: "function".into(),
        function: FunctionCall {
            name: "search".into(),
            arguments: r#"{"q": "a \"b\"", "n": 2}"#.into(),
        },
    }]);
    let msgs = vec![Message::user("find"), a];
    let prompt = encode_messages(&msgs, &tools, ThinkingMode::Thinking).unwrap();
    let completion = prompt.rsplit_once("<think>").unwrap().1;
    let parsed = parse_completion(completion, ThinkingMode::Thinking).unwrap();
    assert_eq!(parsed.content, "Looking.");
    assert_eq!(
        parsed.tool_calls[0].arguments,
        r#"{"q": "a \"b\"", "n": 2}"#
    );
}

#[test]
fn invalid_conversations_are_clear_errors() {
    let chat = |e: crate::Result<String>| match e {
        Err(Error::Chat(msg)) => msg,
        other => panic!("expected Error::Chat, got {other:?}"),
    };
    let mode = ThinkingMode::Chat;
    assert!(chat(encode_messages(&[], &[], mode)).contains("empty"));

    let msg = chat(encode_messages(
        &[Message::user("hi"), Message::tool("c1", "result")],
        &[],
        mode,
    ));
    assert!(
        msg.contains("messages[1]") && msg.contains("tool_calls"),
        "{msg}"
    );

    let msg = chat(encode_messages(
        &[Message::new(Role::Developer, "")],
        &[],
        mode,
    ));
    assert!(msg.contains("developer"), "{msg}");

    let mut a = Message::assistant("");
    a.tool_calls = Some(vec![ToolCall {
        id: None,
        kind: "function".into(),
        function: FunctionCall {
            name: "f".into(),
            arguments: "[1, 2]".into(),
        },
    }]);
    let msg = chat(encode_messages(&[Message::user("x"), a], &[], mode));
    assert!(
        msg.contains("messages[1].tool_calls[0]") && msg.contains("JSON object"),
        "{msg}"
    );

    match parse_messages(r#"[{"role": "wizard", "content": "hi"}]"#) {
        Err(Error::Chat(msg)) => assert!(msg.contains("wizard"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert!(parse_messages(r#"[{"role": "user", "content": null}]"#).is_ok());
    assert!(parse_tools(r#"[{"type": "function", "function": {}}]"#).is_err());
    assert!("turbo".parse::<ThinkingMode>().is_err());
}

#[test]
fn malformed_completions_are_errors() {
    let bad = |text: &str, mode| match parse_completion(text, mode) {
        Err(Error::CompletionFormat(msg)) => msg,
        other => panic!("{text:?}: expected CompletionFormat error, got {other:?}"),
    };
    assert!(bad("no end of reasoning", ThinkingMode::Thinking).contains("</think>"));
    bad("answer<｜end▁of▁sentence｜>more", ThinkingMode::Chat);
    bad("a <think> b<｜end▁of▁sentence｜>", ThinkingMode::Chat);
    bad(
        "r</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nom=\"f\">\n</｜DSML｜invoke>\n\
         </｜DSML｜tool_calls>",
        ThinkingMode::Thinking,
    );
    bad(
        "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n\
         <｜DSML｜parameter name=\"a\" string=\"true\">1</｜DSML｜parameter>\n\
         <｜DSML｜parameter name=\"a\" string=\"true\">2</｜DSML｜parameter>\n\
         </｜DSML｜invoke>\n</｜DSML｜tool_calls>",
        ThinkingMode::Chat,
    );
    bad(
        "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n\
         </｜DSML｜tool_calls>trailing",
        ThinkingMode::Chat,
    );
}

#[test]
fn prompt_tokens_and_stop_ids() {
    let tok = crate::tokenizer::Tokenizer::embedded().unwrap();
    check_tokenizer(&tok).unwrap();
    let prompt = encode_messages(
        &[Message::system("S"), Message::user("Hi")],
        &[],
        ThinkingMode::Chat,
    )
    .unwrap();
    let ids = tok.encode(&prompt).unwrap();
    assert_eq!(ids.first(), Some(&tokens::BOS_ID));
    assert_eq!(
        &ids[ids.len() - 2..],
        &[tokens::ASSISTANT_ID, tokens::THINK_END_ID]
    );
    assert!(ids.contains(&tokens::USER_ID));
    assert_eq!(stop_token_ids(), &[tokens::EOS_ID]);
}
