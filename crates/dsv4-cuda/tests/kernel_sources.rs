//! Checks over the kernel sources that need no GPU.

use std::fs;
use std::path::Path;

/// Every kernel is launched with programmatic dependent launch, so each must open with
/// `pdl_entry()` or `pdl_launch()` (and wait before touching other kernels' memory, see
/// kernels/common.cuh): a kernel without it could run alongside its predecessor.
#[test]
fn every_kernel_waits_for_its_predecessor() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut kernels = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let src = fs::read_to_string(&path).unwrap();
        for (at, _) in src.match_indices("__global__") {
            let body = &src[at..];
            let open = body.find('{').expect("kernel body");
            let head: String = body[open + 1..].chars().take(200).collect();
            let name = body[..open]
                .split('(')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .last();
            assert!(
                head.trim_start()
                    .trim_start_matches('\\')
                    .trim_start()
                    .starts_with("pdl_"),
                "{}: kernel {:?} does not start with pdl_entry()/pdl_launch()",
                path.display(),
                name
            );
            kernels += 1;
        }
    }
    assert!(kernels > 20, "found only {kernels} kernels");
}

/// `#define NAME value` of a kernel file, as a number.
fn kernel_define(file: &str, name: &str) -> usize {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("kernels")
        .join(file);
    let src = fs::read_to_string(&path).unwrap();
    let line = src
        .lines()
        .find(|l| l.split_whitespace().take(2).eq(["#define", name]))
        .unwrap_or_else(|| panic!("{file} defines no {name}"));
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// The host sizes the attention kernels' grids and shared memory from these: they must be the
/// kernels'.
#[test]
fn attention_layout_matches_the_host() {
    use dsv4_cuda::ops::{
        ATT_DMAX, ATT_HEADS, ATT_KEYS, ATT_TC_HEADS, ATT_TC_PP, ATT_TC_QP, COMBINE_MAX_SPLITS,
    };
    assert_eq!(kernel_define("attention.cu", "ATT_KEYS"), ATT_KEYS);
    assert_eq!(kernel_define("attention.cu", "ATT_HEADS"), ATT_HEADS);
    assert_eq!(kernel_define("attention.cu", "ATT_DMAX"), ATT_DMAX);
    assert_eq!(
        kernel_define("attention.cu", "COMBINE_MAX_SPLITS"),
        COMBINE_MAX_SPLITS
    );
    assert_eq!(kernel_define("attention.cu", "ATT_TC_HEADS"), ATT_TC_HEADS);
    assert_eq!(kernel_define("attention.cu", "ATT_TC_QP"), ATT_TC_QP);
    assert_eq!(kernel_define("attention.cu", "ATT_TC_PP"), ATT_TC_PP);
}
