//! The server's backend on GPUs (`dsv4 serve --device cuda[:N[,M...]]`): the CUDA model's
//! batched forward on one GPU, or the pipeline of layer ranges over several, with sequence
//! states in device memory that the prefix cache copies on the device.

use dsv4_core::{Logits, ModelConfig};
use dsv4_cuda::{CudaModel, GpuSeq, PipeItem, PipeSeq, Pipeline};
use dsv4_server::{Backend, BatchItem};

/// What the server needs from a GPU model: sequences made and copied on the device, and the
/// batched forward.
pub trait GpuModel: Send + 'static {
    type Seq: Send + 'static;
    fn new_seq(&self) -> dsv4_cuda::Result<Self::Seq>;
    fn copy_seq(&self, seq: &Self::Seq) -> dsv4_cuda::Result<Self::Seq>;
    fn seq_bytes(seq: &Self::Seq) -> usize;
    fn forward(&self, batch: &mut [BatchItem<'_, Self::Seq>]) -> dsv4_cuda::Result<Vec<Vec<f32>>>;
}

fn want(b: &BatchItem<'_, impl Sized>) -> Logits {
    if b.want_logits {
        Logits::Last
    } else {
        Logits::None
    }
}

impl GpuModel for CudaModel {
    type Seq = GpuSeq;
    fn new_seq(&self) -> dsv4_cuda::Result<GpuSeq> {
        CudaModel::new_seq(self)
    }
    fn copy_seq(&self, seq: &GpuSeq) -> dsv4_cuda::Result<GpuSeq> {
        CudaModel::copy_seq(self, seq)
    }
    fn seq_bytes(seq: &GpuSeq) -> usize {
        seq.bytes()
    }
    fn forward(&self, batch: &mut [BatchItem<'_, GpuSeq>]) -> dsv4_cuda::Result<Vec<Vec<f32>>> {
        let mut items: Vec<dsv4_cuda::BatchItem> = batch
            .iter_mut()
            .map(|b| dsv4_cuda::BatchItem {
                want: want(b),
                seq: &mut *b.state,
                ids: b.tokens,
            })
            .collect();
        self.forward_batch(&mut items)
    }
}

impl GpuModel for Pipeline {
    type Seq = PipeSeq;
    fn new_seq(&self) -> dsv4_cuda::Result<PipeSeq> {
        Pipeline::new_seq(self)
    }
    fn copy_seq(&self, seq: &PipeSeq) -> dsv4_cuda::Result<PipeSeq> {
        Pipeline::copy_seq(self, seq)
    }
    fn seq_bytes(seq: &PipeSeq) -> usize {
        seq.bytes()
    }
    fn forward(&self, batch: &mut [BatchItem<'_, PipeSeq>]) -> dsv4_cuda::Result<Vec<Vec<f32>>> {
        let mut items: Vec<PipeItem> = batch
            .iter_mut()
            .map(|b| PipeItem {
                want: want(b),
                seq: &mut *b.state,
                ids: b.tokens,
            })
            .collect();
        self.forward_batch(&mut items)
    }
}

pub struct CudaBackend<M: GpuModel> {
    model: M,
    config: ModelConfig,
}

impl<M: GpuModel> CudaBackend<M> {
    pub fn new(model: M, config: ModelConfig) -> Self {
        CudaBackend { model, config }
    }
}

impl<M: GpuModel> Backend for CudaBackend<M> {
    type State = M::Seq;

    fn new_state(&self) -> dsv4_core::Result<M::Seq> {
        Ok(self.model.new_seq()?)
    }

    fn copy_state(&self, state: &M::Seq) -> dsv4_core::Result<M::Seq> {
        Ok(self.model.copy_seq(state)?)
    }

    fn state_bytes(&self, state: &M::Seq) -> usize {
        M::seq_bytes(state)
    }

    fn forward(&self, batch: &mut [BatchItem<'_, M::Seq>]) -> dsv4_core::Result<Vec<Vec<f32>>> {
        Ok(self.model.forward(batch)?)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_context(&self) -> usize {
        self.config.max_position_embeddings
    }
}
