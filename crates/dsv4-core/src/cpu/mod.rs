//! The CPU backend: dequantizing kernels and the quantized linear layer.

pub mod gemm;
pub mod kernels;
pub mod linear;
pub mod mlx_rows;
