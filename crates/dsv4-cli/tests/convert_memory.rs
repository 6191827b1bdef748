//! `dsv4 convert` memory on a multi-shard synthetic checkpoint in the official FP8/FP4 formats:
//! the process's peak RSS stays within 2× the largest input shard (plus the binary's baseline),
//! whatever the model size. Slow (writes and converts ~0.5 GB): run with
//! `cargo test --release -p dsv4-cli --test convert_memory -- --ignored --nocapture`.

use serde_json::json;
use std::process::Command;

#[test]
#[ignore]
fn convert_peak_rss_is_bounded_by_the_largest_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut j = dsv4_core::synthetic::flash_config_json();
    let over = json!({"vocab_size": 32768, "hidden_size": 1024, "num_hidden_layers": 8,
        "num_attention_heads": 16, "head_dim": 512, "q_lora_rank": 512, "o_groups": 4,
        "o_lora_rank": 512, "compress_ratios": dsv4_core::synthetic::flash_schedule(8),
        "index_n_heads": 16, "n_routed_experts": 64, "moe_intermediate_size": 1024});
    for (k, v) in over.as_object().unwrap() {
        j[k] = v.clone();
    }
    let shard = 96u64 << 20;
    dsv4_core::synthetic::write_official(&src, &j, 7, shard).unwrap();
    let files: Vec<u64> = std::fs::read_dir(&src)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "safetensors").then(|| p.metadata().unwrap().len())
        })
        .collect();
    let (total, largest) = (files.iter().sum::<u64>(), *files.iter().max().unwrap());
    for quant in ["q4", "mixed-8-mxfp4"] {
        let out = tmp.path().join(quant);
        let o = Command::new(env!("CARGO_BIN_EXE_dsv4"))
            .args(["convert", "--model"])
            .arg(&src)
            .arg("--out")
            .arg(&out)
            .args(["--quant", quant, "--shard-size-gb", "0.1"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        let rss_mb: f64 = err
            .split("peak RSS ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .expect("peak RSS in the report");
        eprintln!(
            "{quant}: input {:.0} MB in {} shards (largest {:.1} MB); {err}",
            total as f64 / 1e6,
            files.len(),
            largest as f64 / 1e6
        );
        assert!(
            rss_mb * 1e6 <= 2.0 * largest as f64 + 64e6,
            "{quant}: peak RSS {rss_mb} MB vs largest shard {} MB",
            largest as f64 / 1e6
        );
    }
}
