//! The `dsv4` binary end to end: `logits` against the reference fixtures (every chunking writes
//! the same .npy), and bad checkpoints giving a one-line error and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn dsv4(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(args)
        .output()
        .expect("run dsv4")
}

fn read_npy(path: &Path) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = npy.shape().to_vec();
    (shape, npy.into_vec::<f32>().unwrap())
}

/// One tensor of a fixture's reference.safetensors, decoded (I64 → i64 or F32 → f32 by `T`).
fn ref_tensor<T>(dir: &Path, key: &str, decode: fn(&[u8]) -> T) -> Vec<T> {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    let width = t.data().len() / t.shape().iter().product::<usize>();
    t.data().chunks_exact(width).map(decode).collect()
}

fn i64_le(c: &[u8]) -> i64 {
    i64::from_le_bytes(c.try_into().unwrap())
}

fn f32_le(c: &[u8]) -> f32 {
    f32::from_le_bytes(c.try_into().unwrap())
}

/// A fixture's prompt ids and one-call reference logits.
fn reference(dir: &Path) -> (Vec<i64>, Vec<f32>) {
    (
        ref_tensor(dir, "ids", i64_le),
        ref_tensor(dir, "logits", f32_le),
    )
}

/// Each of the first `rows` rows of `got` within 1e-4 (relative to the row's max) of `want`.
fn assert_rows_close(what: &str, got: &[f32], want: &[f32], vocab: usize, rows: usize) {
    for r in 0..rows {
        let w = &want[r * vocab..(r + 1) * vocab];
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = got[r * vocab..(r + 1) * vocab]
            .iter()
            .zip(w)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4 * scale, "{what} row {r}: {err}");
    }
}

#[test]
fn logits_command_matches_reference_for_any_chunking() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, want) = reference(&fixture("official-fp8"));
    let ids: Vec<i64> = ids[..60].to_vec();
    let vocab = want.len() / 300;
    let list = ids
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let model = fixture("official-fp8");
    for chunks in [None, Some("7,1,13,1,1,37"), Some(&*vec!["1"; 60].join(","))] {
        let out = dir.path().join("l.npy");
        let mut args = vec![
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            &list,
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(c) = chunks {
            args.extend(["--chunks", c]);
        }
        let o = dsv4(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (shape, got) = read_npy(&out);
        assert_eq!(shape, vec![60, vocab as u64]);
        assert_rows_close(&format!("chunks {chunks:?}"), &got, &want, vocab, 60);
    }
}

/// Copies a fixture into a temp dir so a test can damage it.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

/// Runs `dsv4 logits` on a damaged checkpoint: must fail cleanly with one line naming `needle`.
fn expect_clean_error(dir: &Path, needle: &str) {
    let out = dir.join("x.npy");
    let o = dsv4(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--ids",
        "1,2,3",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "`{needle}` not in: {err}");
}

/// Rewrites one tensor's header entry of a single-file checkpoint.
fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn truncated_shard_is_a_clean_error() {
    let d = copy_fixture("official-fp8");
    let shard = d.path().join("model-00002-of-00002.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    expect_clean_error(d.path(), "model-00002-of-00002.safetensors");
}

#[test]
fn missing_shard_is_a_clean_error() {
    let d = copy_fixture("official-fp8");
    std::fs::remove_file(d.path().join("model-00001-of-00002.safetensors")).unwrap();
    expect_clean_error(d.path(), "model-00001-of-00002.safetensors");
}

#[test]
fn missing_tensor_is_a_clean_error() {
    let d = copy_fixture("hf-bf16");
    edit_header(&d.path().join("model.safetensors"), |h| {
        // Renamed rather than removed: safetensors requires contiguous data offsets.
        let t = h.remove("model.layers.1.self_attn.kv_norm.weight").unwrap();
        h.insert("model.layers.1.self_attn.kv_norm.unused".into(), t);
    });
    expect_clean_error(d.path(), "layers.1.attn.kv_norm.weight");
}

#[test]
fn wrong_shape_is_a_clean_error() {
    let d = copy_fixture("hf-bf16");
    edit_header(&d.path().join("model.safetensors"), |h| {
        let t = h
            .get_mut("model.layers.0.self_attn.q_a_proj.weight")
            .unwrap();
        let shape = t["shape"].as_array().unwrap().clone();
        let (a, b) = (shape[0].as_u64().unwrap(), shape[1].as_u64().unwrap());
        t["shape"] = serde_json::json!([b, a]);
    });
    expect_clean_error(d.path(), "q_a_proj.weight");
}

#[test]
fn unknown_dtype_is_a_clean_error() {
    let d = copy_fixture("hf-bf16");
    edit_header(&d.path().join("model.safetensors"), |h| {
        h.get_mut("model.norm.weight").unwrap()["dtype"] = serde_json::json!("Q7_WEIRD");
    });
    expect_clean_error(d.path(), "model.safetensors");
}

#[test]
fn bad_config_is_a_clean_error() {
    let d = copy_fixture("hf-bf16");
    std::fs::write(
        d.path().join("config.json"),
        "{\"model_type\": \"deepseek_v4\", ",
    )
    .unwrap();
    expect_clean_error(d.path(), "config.json");
    std::fs::write(
        d.path().join("config.json"),
        "{\"model_type\": \"deepseek_v4\"}",
    )
    .unwrap();
    expect_clean_error(d.path(), "num_hidden_layers");
}

#[test]
fn bad_ids_and_chunks_are_clean_errors() {
    let model = fixture("hf-bf16");
    let o = dsv4(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1,99999",
        "--out",
        "/dev/null",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("99999"));
    let o = dsv4(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1,2,3",
        "--chunks",
        "2,2",
        "--out",
        "/dev/null",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--chunks"));
}

#[test]
fn inspect_prints_schedule_and_formats() {
    let o = dsv4(&[
        "inspect",
        "--model",
        fixture("official-fp8").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "csa/4",
        "hca/128",
        "sliding",
        "F8_E4M3",
        "F8_E8M0",
        "I8",
        "layers.1.ffn.experts.0.w1.weight",
    ] {
        assert!(s.contains(needle), "inspect output lacks {needle}");
    }
}

fn reference_ids(name: &str, key: &str) -> Vec<u32> {
    ref_tensor(&fixture(name), key, |c| i64_le(c) as u32)
}

/// The last stdout line of `generate --json`, parsed.
fn json_line(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.trim_end().lines().last().unwrap()).unwrap()
}

#[test]
fn greedy_generation_equals_reference_continuation() {
    for name in ["official-fp8", "hf-bf16", "official-vocab"] {
        let prompt = reference_ids(name, "greedy_prompt");
        let mut want = reference_ids(name, "greedy_ids");
        if let Some(eos) = want.iter().position(|&t| t == 1) {
            want.truncate(eos + 1); // generation stops at EOS
        }
        let ids = prompt
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let dir = fixture(name);
        let o = dsv4(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--ids",
            &ids,
            "--temperature",
            "0",
            "--max-tokens",
            &want.len().to_string(),
            "--json",
        ]);
        let v = json_line(&o);
        let got: Vec<u32> = v["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(got, want, "{name}");
        assert_eq!(v["prompt_ids"].as_array().unwrap().len(), prompt.len());
        for k in ["prefill_tok_s", "decode_tok_s", "peak_rss_bytes"] {
            assert!(v[k].as_f64().unwrap() > 0.0, "{k}");
        }
    }
}

#[test]
fn demo_runs_without_a_model_and_seeds_repeat() {
    let run = |seed: &str| {
        json_line(&dsv4(&[
            "generate",
            "--prompt",
            "Hello",
            "--max-tokens",
            "12",
            "--seed",
            seed,
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--json",
        ]))
    };
    let (a, b, c) = (run("7"), run("7"), run("8"));
    assert_eq!(a["token_ids"], b["token_ids"]);
    assert_ne!(a["token_ids"], c["token_ids"]);
    assert_eq!(a["token_ids"].as_array().unwrap().len(), 12);
    assert_eq!(a["finish_reason"], "length");
    // The V4 chat format: BOS, <｜User｜>, text, <｜Assistant｜>, </think>.
    let p: Vec<u64> = a["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(
        (p[0], p[1], p[p.len() - 2], p[p.len() - 1]),
        (0, 128803, 128804, 128822)
    );
}

#[test]
fn generate_rejects_bad_input_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let bad_json = dir.path().join("m.json");
    std::fs::write(&bad_json, "[{\"role\": \"user\", \"content\": \"hi\"").unwrap();
    let bad_role = dir.path().join("r.json");
    std::fs::write(&bad_role, "[{\"role\": \"wizard\", \"content\": \"hi\"}]").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--ids", "5,129280"], "129280"),
        (vec!["--prompt", ""], "empty"),
        (vec!["--messages", bad_json.to_str().unwrap()], "JSON"),
        (vec!["--messages", bad_role.to_str().unwrap()], "wizard"),
        (vec!["--prompt", "hi", "--temperature=-1"], "temperature"),
        (vec!["--prompt", "hi", "--top-p", "0"], "top_p"),
        (vec!["--prompt", "hi", "--raw", "--system", "s"], "--raw"),
        (vec!["--prompt", "hi", "--ids", "1,2"], "--ids"),
        (vec!["--prompt", "hi", "--thinking", "deep"], "deep"),
        (vec!["--prompt", "hi", "--act-quant"], "--numerics official"),
        (vec!["--prompt", "hi", "--numerics", "fast"], "fast"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["generate", "--max-tokens", "2"];
        all.extend(args.iter());
        let o = dsv4(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_ne!(o.status.code(), Some(0), "{args:?} should fail");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: `{needle}` not in {err}");
    }
}

#[test]
fn over_long_prompt_is_rejected() {
    // The hf-bf16 fixture's context (max_position_embeddings) is small enough to exceed.
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("hf-bf16").join("config.json")).unwrap(),
    )
    .unwrap();
    let ctx = cfg["max_position_embeddings"].as_u64().unwrap() as usize;
    let ids = vec!["5"; ctx + 1].join(",");
    let o = dsv4(&[
        "generate",
        "--model",
        fixture("hf-bf16").to_str().unwrap(),
        "--ids",
        &ids,
        "--max-tokens",
        "2",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("context"), "{err}");
}

#[test]
fn chat_keeps_the_cache_across_turns() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(["chat", "--max-tokens", "5", "--temperature", "0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let first = "Tell me a long story about the sea, the ships that sail on it, the sailors who work them, and the storms they meet";
    let input = format!("{first}\nAnd then?\n/reset\n{first}\n");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // Prefill counts per turn from the stats lines: "prefill N tok".
    let prefills: Vec<usize> = err
        .lines()
        .filter_map(|l| l.split("prefill ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(prefills.len(), 3, "{err}");
    // Turn 2 prefills only its own few tokens, not the long first turn again; after /reset the
    // first message is prefilled in full once more.
    assert!(prefills[0] > 20, "{prefills:?}");
    assert!(prefills[1] < 12, "{prefills:?}");
    assert_eq!(prefills[2], prefills[0], "{prefills:?}");
}

#[test]
fn logits_command_runs_the_official_profile() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures-official/official-fp8");
    let (ids, want) = reference(&dir);
    let vocab = want.len() / ids.len();
    let n = 40; // row t depends only on tokens ≤ t: a prefix reproduces the leading rows
    let list = ids[..n]
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.npy");
    let o = dsv4(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--ids",
        &list,
        "--chunks",
        "7,1,13,19",
        "--numerics",
        "official",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, got) = read_npy(&out);
    assert_rows_close("official profile", &got, &want, vocab, n);
}

/// `--device` names are checked, and a CUDA device on a build without the CUDA backend (or on a
/// machine without a GPU) is a one-line error, never a panic.
#[test]
fn device_errors_are_clean() {
    let m = fixture("hf-bf16");
    let m = m.to_str().unwrap();
    let out = std::env::temp_dir().join("dsv4-device-test.npy");
    let out = out.to_str().unwrap();
    let o = dsv4(&[
        "logits", "--model", m, "--ids", "1,2", "--out", out, "--device", "gpu",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--device must be"));
    let o = dsv4(&[
        "logits", "--model", m, "--ids", "1,2", "--out", out, "--device", "cuda",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    // Without a GPU (CI) this fails cleanly: no CUDA support in this build, or no driver.
    if !o.status.success() {
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("without CUDA support") || err.contains("CUDA") || err.contains("GPU"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // A list of GPUs (pipeline stages) is parsed; a malformed one is refused by name.
    let o = dsv4(&[
        "logits", "--model", m, "--ids", "1,2", "--out", out, "--device", "cuda:0,x",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--device must be"));
    // Accepted, then either run (a machine with 2 GPUs) or refused cleanly (no CUDA build, no
    // driver, one GPU).
    let parsed_then_clean = |o: std::process::Output| {
        let err = String::from_utf8_lossy(&o.stderr);
        if !o.status.success() {
            assert_eq!(o.status.code(), Some(1), "{err}");
            assert!(
                !err.contains("--device must be") && !err.contains("panicked"),
                "{err}"
            );
        }
    };
    parsed_then_clean(dsv4(&[
        "logits", "--model", m, "--ids", "1,2", "--out", out, "--device", "cuda:0,1",
    ]));
    // The benchmark takes a pipeline too.
    parsed_then_clean(dsv4(&[
        "bench",
        "--device",
        "cuda:0,1",
        "--layers",
        "2",
        "--prompts",
        "0",
        "--contexts",
        "16",
        "--batch",
        "1",
        "--decode",
        "1",
    ]));
}

/// The CPU bench decodes batches of sequences stepping together, one JSON row per size.
#[test]
fn cpu_bench_measures_decode_batches() {
    let o = dsv4(&[
        "bench",
        "--layers",
        "2",
        "--experts",
        "8",
        "--vocab",
        "512",
        "--prompt",
        "4",
        "--decode",
        "2",
        "--batch",
        "1,2,3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = json_line(&o);
    let rows = j["batch_decode"].as_array().expect("batch_decode rows");
    let sizes: Vec<u64> = rows.iter().map(|r| r["batch"].as_u64().unwrap()).collect();
    assert_eq!(
        sizes,
        [2, 3],
        "sizes above 1 are measured after the single-sequence run"
    );
    for r in rows {
        let (step, tok_s) = (
            r["step_median_s"].as_f64().unwrap(),
            r["tok_s"].as_f64().unwrap(),
        );
        assert!(step > 0.0 && (tok_s * step - r["batch"].as_f64().unwrap()).abs() < 1e-6);
    }
}
