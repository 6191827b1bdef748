//! Measurement helpers for `dsv4 bench`: the machine's memory read bandwidth and the process's
//! peak resident memory.

use rayon::prelude::*;
use std::time::Instant;

/// Best-of-`reps` multithreaded read bandwidth over a `bytes`-sized buffer, in bytes/s.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 4;
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 251) as f32).collect();
    let chunk = (n / (rayon::current_num_threads() * 8)).max(1 << 16);
    let mut best = 0f64;
    for _ in 0..reps {
        let t = Instant::now();
        let s: f32 = buf
            .par_chunks(chunk)
            .map(|c| crate::cpu::kernels::dot_f32(c, c).min(1.0))
            .sum();
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((n * 4) as f64 / dt);
    }
    best
}

/// Peak resident set size of this process (`VmHWM`), in bytes; 0 where unavailable.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
