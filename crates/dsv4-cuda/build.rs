//! Compiles `kernels/all.cu` with nvcc into one fatbin (sm_90a machine code + compute_90 PTX)
//! that the crate embeds. nvcc is found through `$NVCC`, `$CUDA_HOME`/`$CUDA_PATH`, the `PATH`,
//! or the pip-installed toolkit of `scripts/install-nvcc.sh` (`.nvcc/` at the workspace root).

use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = std::env::var(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    let lib = root.join(".nvcc/lib");
    for entry in std::fs::read_dir(&lib).ok()?.flatten() {
        let p = entry.path().join("site-packages/nvidia/cu13/bin/nvcc");
        if p.exists() {
            return Some(p);
        }
    }
    None
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest.join("../..");
    let kernels = manifest.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let Some(nvcc) = find_nvcc(&root) else {
        panic!(
            "dsv4-cuda needs nvcc (CUDA 13.0) to compile its kernels: set NVCC or CUDA_HOME, put \
             nvcc on PATH, or run scripts/install-nvcc.sh (pip wheels, no root needed)"
        );
    };
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("kernels.fatbin");
    let status = Command::new(&nvcc)
        .args([
            "-std=c++17",
            "-O3",
            "-fatbin",
            "-gencode=arch=compute_90a,code=sm_90a",
            "-gencode=arch=compute_90,code=compute_90",
            "-o",
        ])
        .arg(&out)
        .arg(kernels.join("all.cu"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on kernels/all.cu");
}
