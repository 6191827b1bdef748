//! dsv4-cuda: the DeepSeek-V4 forward on an NVIDIA GPU. Weights are uploaded in their stored
//! formats and decoded inside the kernels (compiled ahead of time by nvcc, embedded in the
//! binary); activations and all arithmetic are f32, like the CPU reference, so the GPU matches
//! it op by op. `CudaModel` (one GPU) and `Pipeline` (the layers split over several) implement
//! [`dsv4_core::Engine`].

pub mod blaslt;
pub mod gpu;
pub mod model;
pub mod moe_ffn;
pub mod ops;
mod pipeline;
pub mod quant;
mod state;
pub mod weights;

pub use cudarc;
pub use gpu::Gpu;
pub use model::{BatchItem, CudaModel, PartOut};
pub use pipeline::{split_layers, PipeItem, PipeSeq, Pipeline};
pub use state::{synthetic_layer_bytes, GpuSeq};

/// Everything that can go wrong on the device, each with a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no CUDA driver: {0}")]
    NoDriver(String),
    #[error("no GPU: {0}")]
    NoDevice(String),
    #[error("unsupported GPU: {0}")]
    Arch(String),
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
    #[error("CUDA error: {0}")]
    Driver(String),
    #[error("not supported on the CUDA backend: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Core(#[from] dsv4_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for dsv4_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Core(c) => c,
            other => dsv4_core::Error::Backend(other.to_string()),
        }
    }
}
