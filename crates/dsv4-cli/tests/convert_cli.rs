//! `dsv4 convert` and `dsv4 inspect` on MLX formats, end to end through the binary.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn dsv4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(args)
        .output()
        .expect("run dsv4")
}

#[test]
fn convert_then_inspect_reports_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q4");
    let (src, dst) = (fixture("mlx-src"), out.to_str().unwrap().to_string());
    let o = dsv4(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--out",
        &dst,
        "--quant",
        "q4",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("wrote") && err.contains("peak RSS"), "{err}");
    let o = dsv4(&["inspect", "--model", &dst]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("mlx-lm key names"), "{text}");
    // q4/g64 with bf16 scales and biases: 4 + 2·16/64 bits per weight.
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("affine q4/g64 bf16"))
        .unwrap_or_else(|| panic!("no q4 line in\n{text}"));
    assert!(line.trim_end().ends_with("4.500"), "{line}");

    // Converting again into the same directory is refused, and nothing is touched.
    let o = dsv4(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--out",
        &dst,
        "--quant",
        "q4",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
}

#[test]
fn inspect_shows_mx_formats() {
    let o = dsv4(&["inspect", "--model", fixture("mlx-mixed").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mx = text
        .lines()
        .find(|l| l.trim_start().starts_with("mxfp4 "))
        .unwrap();
    assert!(mx.trim_end().ends_with("4.250"), "{mx}");
    assert!(text.contains("affine q8/g64 bf16"), "{text}");
    assert!(text.contains("per-module overrides"), "{text}");
}

#[test]
fn bad_quant_type_is_a_clean_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("x");
    let o = dsv4(&[
        "convert",
        "--model",
        fixture("mlx-src").to_str().unwrap(),
        "--out",
        dst.to_str().unwrap(),
        "--quant",
        "q7",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("q7") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!dst.exists());
}
