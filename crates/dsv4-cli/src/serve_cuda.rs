//! The server's backend on one GPU (`dsv4 serve --device cuda[:N]`): the CUDA model's batched
//! forward, with sequence states in device memory that the prefix cache copies on the device.

use dsv4_core::{Logits, ModelConfig};
use dsv4_cuda::{CudaModel, GpuSeq};
use dsv4_server::{Backend, BatchItem};

pub struct CudaBackend {
    model: CudaModel,
    config: ModelConfig,
}

impl CudaBackend {
    pub fn new(model: CudaModel, config: ModelConfig) -> Self {
        CudaBackend { model, config }
    }
}

impl Backend for CudaBackend {
    type State = GpuSeq;

    fn new_state(&self) -> dsv4_core::Result<GpuSeq> {
        Ok(self.model.new_seq()?)
    }

    fn copy_state(&self, state: &GpuSeq) -> dsv4_core::Result<GpuSeq> {
        Ok(self.model.copy_seq(state)?)
    }

    fn state_bytes(&self, state: &GpuSeq) -> usize {
        state.bytes()
    }

    fn forward(&self, batch: &mut [BatchItem<'_, GpuSeq>]) -> dsv4_core::Result<Vec<Vec<f32>>> {
        let mut items: Vec<dsv4_cuda::BatchItem> = batch
            .iter_mut()
            .map(|b| dsv4_cuda::BatchItem {
                seq: &mut *b.state,
                ids: b.tokens,
                want: if b.want_logits {
                    Logits::Last
                } else {
                    Logits::None
                },
            })
            .collect();
        Ok(self.model.forward_batch(&mut items)?)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_context(&self) -> usize {
        self.config.max_position_embeddings
    }
}
