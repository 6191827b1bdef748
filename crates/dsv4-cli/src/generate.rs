//! `dsv4 generate` and `dsv4 chat`: tokenize, apply the V4 chat format, stream the continuation.
//! Without `--model` both run the built-in demo (a tiny DeepSeek-V4 with random weights and the
//! real tokenizer) so they work on a fresh machine.

use anyhow::{bail, Context, Result};
use clap::Args;
use dsv4_core::chat::{self, Message, ThinkingMode, Tool};
use dsv4_core::generate::{GenerateOptions, Generation, Session};
use dsv4_core::sampling::SamplingParams;
use dsv4_core::tokenizer::Tokenizer;
use dsv4_core::{bench, synthetic, Checkpoint, Engine, Model};
use serde_json::json;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Model selection and sampling, shared by `generate` and `chat`.
#[derive(Args, Clone)]
pub struct CommonArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json). Default: the built-in
    /// demo model with random weights.
    #[arg(long)]
    model: Option<PathBuf>,
    /// tokenizer.json to use instead of the checkpoint's (default: the checkpoint's, else the
    /// embedded DeepSeek-V4 tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Same seed and input → same output.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Thinking mode: chat (no reasoning), thinking, or max (maximum reasoning effort).
    #[arg(long, default_value = "chat")]
    thinking: String,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    numerics: crate::NumericsArgs,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// User message (chat-formatted unless --raw).
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// Prompt token ids, fed as they are.
    #[arg(long, value_delimiter = ',', group = "input")]
    ids: Option<Vec<u32>>,
    /// A JSON file: an array of OpenAI-style messages, or {"messages": [...], "tools": [...]}.
    #[arg(long, group = "input")]
    messages: Option<PathBuf>,
    /// Skip the chat format: BOS + the prompt text.
    #[arg(long)]
    raw: bool,
    /// Return the top-N log-probabilities of each generated token (with --json).
    #[arg(long)]
    logprobs: Option<usize>,
    /// At the end, print one JSON object with ids, text and timings on the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    common: CommonArgs,
}

/// A model ready to generate: weights, tokenizer, and what to call it.
struct Loaded {
    model: Box<dyn Engine>,
    tok: Tokenizer,
    load_s: f64,
}

fn load(c: &CommonArgs) -> Result<Loaded> {
    let t = Instant::now();
    let (ck, default_tok) = match &c.model {
        Some(dir) => {
            let ck = open_with_progress(dir)?;
            let tj = dir.join("tokenizer.json");
            (ck, tj.exists().then_some(tj))
        }
        None => {
            eprintln!(
                "dsv4: no --model given: running the built-in DEMO model (a tiny DeepSeek-V4 with \
                 RANDOM weights and the real tokenizer; its output is meaningless). Pass --model DIR \
                 to run a real checkpoint."
            );
            (
                synthetic::checkpoint(synthetic::demo_config(), 0x5eed)?,
                None,
            )
        }
    };
    let mut model = Model::load(&ck)?;
    model.numerics = c.numerics.profile()?;
    let model = c.numerics.engine(model)?;
    let tok = match c.tokenizer.as_ref().or(default_tok.as_ref()) {
        Some(p) => Tokenizer::from_file(p)?,
        None => Tokenizer::embedded()?,
    };
    Ok(Loaded {
        model,
        tok,
        load_s: t.elapsed().as_secs_f64(),
    })
}

/// Opens a checkpoint, reporting each shard as it is mapped and validated.
fn open_with_progress(dir: &Path) -> Result<Checkpoint> {
    let quiet = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    Ok(Checkpoint::open_with_progress(dir, |i, n, path, bytes| {
        if !quiet || i + 1 == n {
            eprint!(
                "\rdsv4: loading {} shard {}/{n} ({:.2} GB){}",
                dir.display(),
                i + 1,
                bytes as f64 / 1e9,
                if i + 1 == n { "\n" } else { "" }
            );
        }
        let _ = path;
    })?)
}

fn sampling(c: &CommonArgs, logprobs: Option<usize>) -> SamplingParams {
    SamplingParams {
        temperature: c.temperature,
        top_k: c.top_k,
        top_p: c.top_p,
        min_p: c.min_p,
        repetition_penalty: c.repetition_penalty,
        presence_penalty: c.presence_penalty,
        frequency_penalty: c.frequency_penalty,
        seed: c.seed,
        logprobs,
    }
}

fn options(c: &CommonArgs, logprobs: Option<usize>) -> Result<GenerateOptions> {
    let sampling = sampling(c, logprobs);
    sampling.validate()?;
    if c.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    Ok(GenerateOptions {
        max_tokens: c.max_tokens,
        sampling,
        stop_ids: chat::stop_token_ids().to_vec(),
        stop_strings: c.stop.clone(),
    })
}

/// Reads a messages file: an array of messages or an object with `messages` (and `tools`).
fn read_messages(path: &Path) -> Result<(Vec<Message>, Vec<Tool>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let (msgs, tools) = match &v {
        serde_json::Value::Array(_) => (v.clone(), json!([])),
        serde_json::Value::Object(m) => (
            m.get("messages")
                .cloned()
                .with_context(|| format!("{}: no `messages` field", path.display()))?,
            m.get("tools").cloned().unwrap_or(json!([])),
        ),
        _ => bail!(
            "{}: expected a JSON array of messages or an object with `messages`",
            path.display()
        ),
    };
    let msgs =
        chat::parse_messages(&msgs.to_string()).with_context(|| path.display().to_string())?;
    let tools =
        chat::parse_tools(&tools.to_string()).with_context(|| path.display().to_string())?;
    Ok((msgs, tools))
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let mode: ThinkingMode = a.common.thinking.parse()?;
    if a.raw && (a.messages.is_some() || a.ids.is_some()) {
        bail!("--raw applies to --prompt only");
    }
    if a.raw && a.common.system.is_some() {
        bail!("--raw skips the chat format, so --system cannot be used with it");
    }
    if a.logprobs.is_some() && !a.json {
        bail!("--logprobs is reported in the --json output; add --json");
    }
    let opts = options(&a.common, a.logprobs)?;
    let l = load(&a.common)?;
    let prompt_ids: Vec<u32> = if let Some(ids) = &a.ids {
        ids.clone()
    } else {
        let text = if let Some(p) = &a.messages {
            let (msgs, tools) = read_messages(p)?;
            chat::encode_messages(&msgs, &tools, mode)?
        } else {
            let p = a
                .prompt
                .as_deref()
                .context("give one of --prompt, --ids or --messages")?;
            if p.is_empty() {
                bail!("the prompt is empty");
            }
            if a.raw {
                format!("{}{p}", chat::tokens::BOS)
            } else {
                let mut msgs = Vec::new();
                if let Some(s) = &a.common.system {
                    msgs.push(Message::system(s));
                }
                msgs.push(Message::user(p));
                chat::encode_messages(&msgs, &[], mode)?
            }
        };
        l.tok.encode(&text)?
    };
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    let mut session = Session::new(&*l.model)?;
    let stdout = std::io::stdout();
    let g = session.generate(&prompt_ids, &l.tok, &opts, |s| {
        let mut o = stdout.lock();
        let _ = o.write_all(s.as_bytes());
        let _ = o.flush();
    })?;
    println!();
    report(&l, &g);
    if a.json {
        let mut out = json!({
            "prompt_ids": prompt_ids,
            "token_ids": g.token_ids,
            "text": g.text,
            "finish_reason": g.finish_reason.as_str(),
            "prefill_tok_s": g.prefill_tok_s(),
            "decode_tok_s": g.decode_tok_s(),
            "peak_rss_bytes": bench::peak_rss_bytes(),
            "load_s": l.load_s,
        });
        if !a.raw && a.ids.is_none() {
            if let Ok(m) = chat::parse_completion(&g.text, mode) {
                out["message"] = json!({
                    "reasoning_content": m.reasoning_content,
                    "content": m.content,
                    "tool_calls": m.tool_calls.iter().map(|c| json!({"name": c.name, "arguments": c.arguments})).collect::<Vec<_>>(),
                });
            }
        }
        if a.logprobs.is_some() {
            out["logprobs"] = json!(g
                .logprobs
                .iter()
                .map(|s| json!({"token": s.token, "logprob": s.logprob,
                    "top_logprobs": s.top_logprobs.iter().map(|(t, p)| json!([t, p])).collect::<Vec<_>>()}))
                .collect::<Vec<_>>());
        }
        println!("{out}");
    }
    Ok(())
}

/// The closing line on stderr: load time, speeds, memory.
fn report(l: &Loaded, g: &Generation) {
    eprintln!(
        "[{} tokens, {}; load {:.2} s, prefill {} tok at {:.1} tok/s, decode {:.1} tok/s, peak memory {:.2} GB]",
        g.token_ids.len(),
        g.finish_reason.as_str(),
        l.load_s,
        g.prefilled_tokens,
        g.prefill_tok_s(),
        g.decode_tok_s(),
        bench::peak_rss_bytes() as f64 / 1e9
    );
}

const CHAT_HELP: &str =
    "commands: /reset (new conversation), /mode chat|thinking|max, /help, /quit";

pub fn run_chat(a: ChatArgs) -> Result<()> {
    let mut mode: ThinkingMode = a.common.thinking.parse()?;
    let opts = options(&a.common, None)?;
    let l = load(&a.common)?;
    chat::check_tokenizer(&l.tok)?;
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        eprintln!("{CHAT_HELP}");
    }
    let mut history: Vec<Message> = Vec::new();
    if let Some(s) = &a.common.system {
        history.push(Message::system(s));
    }
    let base = history.clone();
    let mut session = Session::new(&*l.model)?;
    // The text of the tokens the session holds.
    let mut cached_text = String::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let mut parts = cmd.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some("quit" | "exit"), _) => break,
                (Some("reset"), _) => {
                    history = base.clone();
                    session.reset()?;
                    cached_text.clear();
                    eprintln!("(new conversation)");
                }
                (Some("mode"), Some(m)) => match m.parse() {
                    Ok(m) => {
                        mode = m;
                        eprintln!("(mode: {m:?})");
                    }
                    Err(e) => eprintln!("{e}"),
                },
                _ => eprintln!("{CHAT_HELP}"),
            }
            continue;
        }
        history.push(Message::user(line));
        let text = chat::encode_messages(&history, &[], mode)?;
        // Reuse the cache when the new prompt extends what it holds: only the new turn is
        // prefilled. (Thinking mode drops past reasoning, which changes the history.)
        let ids = match text.strip_prefix(cached_text.as_str()) {
            Some(rest) if !cached_text.is_empty() => {
                let mut ids = session.tokens().to_vec();
                ids.extend(l.tok.encode(rest)?);
                ids
            }
            _ => l.tok.encode(&text)?,
        };
        let stdout = std::io::stdout();
        let g = match session.generate(&ids, &l.tok, &opts, |s| {
            let mut o = stdout.lock();
            let _ = o.write_all(s.as_bytes());
            let _ = o.flush();
        }) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
                continue;
            }
        };
        println!();
        report(&l, &g);
        let parsed = chat::parse_completion(&g.text, mode).unwrap_or(chat::ParsedMessage {
            reasoning_content: None,
            content: g.text.clone(),
            tool_calls: Vec::new(),
        });
        let mut reply = Message::assistant(&parsed.content);
        reply.reasoning_content = parsed.reasoning_content;
        history.push(reply);
        // Feed the reply's last tokens too (the final sample and stop token are not in the
        // cache yet), so the next turn only prefills its own text.
        let mut held = ids;
        held.extend(&g.token_ids);
        session.prefill(&held)?;
        cached_text = l.tok.decode(session.tokens())?;
    }
    Ok(())
}
