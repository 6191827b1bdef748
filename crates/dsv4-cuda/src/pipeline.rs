//! The model split by layers over several GPUs (`--device cuda:0,1`): stage `i` holds a
//! contiguous run of layers on its GPU, the first also the embedding and the last the head. A
//! call runs the stages in turn; between two stages the hidden streams of its tokens
//! (`[tokens, hc_mult, hidden]` f32, 64 KB per token for Flash) go through host memory. Each
//! stage keeps its own decode graphs, scratch and per-sequence caches.

use crate::model::{check_ids, forward_chunks, BatchItem, PartOut, MAX_CHUNK};
use crate::state::GpuSeq;
use crate::weights::Ends;
use crate::{CudaModel, Error, Result};
use dsv4_core::{Engine, EngineState, Logits, Model, ModelConfig};

pub struct Pipeline {
    stages: Vec<CudaModel>,
    config: ModelConfig,
}

/// One sequence's caches: its share on every stage.
pub struct PipeSeq {
    pub stages: Vec<GpuSeq>,
}

impl PipeSeq {
    /// Tokens fed so far.
    pub fn pos(&self) -> usize {
        self.stages.first().map_or(0, |s| s.pos)
    }

    /// Device bytes held on all stages.
    pub fn bytes(&self) -> usize {
        self.stages.iter().map(GpuSeq::bytes).sum()
    }
}

/// One sequence of a batched call (as [`BatchItem`]).
pub struct PipeItem<'a> {
    pub seq: &'a mut PipeSeq,
    pub ids: &'a [u32],
    pub want: Logits,
}

impl<'a> PipeItem<'a> {
    /// One item per sequence, each wanting its last row's logits (as
    /// [`BatchItem::last_rows`]).
    pub fn last_rows<T: AsRef<[u32]>>(seqs: &'a mut [PipeSeq], ids: &'a [T]) -> Vec<Self> {
        seqs.iter_mut()
            .zip(ids)
            .map(|(seq, ids)| PipeItem {
                seq,
                ids: ids.as_ref(),
                want: Logits::Last,
            })
            .collect()
    }
}

/// Contiguous layer ranges, one per stage, as even in count as they can be.
pub fn split_layers(layers: usize, stages: usize) -> Vec<std::ops::Range<usize>> {
    let stages = stages.clamp(1, layers.max(1));
    (0..stages)
        .map(|i| i * layers / stages..(i + 1) * layers / stages)
        .collect()
}

impl Pipeline {
    /// Uploads `model` over the GPUs `ordinals` (one stage each, in order; an ordinal may
    /// repeat, which runs several stages on one GPU).
    pub fn new(model: &Model, ordinals: &[usize]) -> Result<Self> {
        if ordinals.is_empty() {
            return Err(Error::Unsupported("a pipeline of no GPUs".into()));
        }
        let ranges = split_layers(model.config.num_layers, ordinals.len());
        let last = ranges.len() - 1;
        let stages = ranges
            .into_iter()
            .zip(ordinals)
            .enumerate()
            .map(|(i, (r, &o))| {
                let ends = Ends {
                    embed: i == 0,
                    head: i == last,
                };
                CudaModel::from_model_part(model, o, r, ends)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Pipeline {
            stages,
            config: model.config.clone(),
        })
    }

    /// A pipeline of stages built elsewhere (the benchmark's synthetic layers): the first
    /// must hold the embedding, the last the head, none between either, and their layers
    /// together `config`'s.
    pub fn from_stages(stages: Vec<CudaModel>, config: ModelConfig) -> Result<Self> {
        let last = stages
            .len()
            .checked_sub(1)
            .ok_or_else(|| Error::Unsupported("a pipeline of no GPUs".into()))?;
        for (i, st) in stages.iter().enumerate() {
            let w = &st.weights;
            if w.embed.is_some() != (i == 0) || w.head.is_some() != (i == last) {
                return Err(Error::Unsupported(format!(
                    "pipeline stage {i} of {}: the embedding belongs on the first stage and \
                     the head on the last",
                    last + 1
                )));
            }
        }
        let layers: usize = stages.iter().map(|s| s.weights.layers.len()).sum();
        if layers != config.num_layers {
            return Err(Error::Unsupported(format!(
                "pipeline stages hold {layers} layers, the model has {}",
                config.num_layers
            )));
        }
        Ok(Pipeline { stages, config })
    }

    pub fn stages(&self) -> &[CudaModel] {
        &self.stages
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn new_seq(&self) -> Result<PipeSeq> {
        let stages = self
            .stages
            .iter()
            .map(CudaModel::new_seq)
            .collect::<Result<Vec<_>>>()?;
        Ok(PipeSeq { stages })
    }

    /// An independent copy of `seq` on every stage.
    pub fn copy_seq(&self, seq: &PipeSeq) -> Result<PipeSeq> {
        if seq.stages.len() != self.stages.len() {
            return Err(Error::Unsupported(
                "a sequence state of another pipeline".into(),
            ));
        }
        let stages = self
            .stages
            .iter()
            .zip(&seq.stages)
            .map(|(m, s)| m.copy_seq(s))
            .collect::<Result<Vec<_>>>()?;
        Ok(PipeSeq { stages })
    }

    /// Feeds `ids` to one sequence (in calls of at most [`MAX_CHUNK`] tokens).
    pub fn forward(&self, seq: &mut PipeSeq, ids: &[u32], want: Logits) -> Result<Vec<f32>> {
        forward_chunks(ids, want, |ids, want| {
            let mut items = [PipeItem {
                seq: &mut *seq,
                ids,
                want,
            }];
            self.forward_batch(&mut items)
        })
    }

    /// Feeds several sequences in one pass per stage (as [`CudaModel::forward_batch`]). Inputs
    /// (every stage's share of each state, the token ids) are checked before any stage runs,
    /// so a refused call changes no state.
    pub fn forward_batch(&self, items: &mut [PipeItem<'_>]) -> Result<Vec<Vec<f32>>> {
        let vocab = self.config.vocab_size;
        for it in items.iter() {
            let ours = it.seq.stages.len() == self.stages.len()
                && self
                    .stages
                    .iter()
                    .zip(&it.seq.stages)
                    .all(|(m, s)| m.owns(s));
            if !ours {
                return Err(Error::Unsupported(
                    "a sequence state of another pipeline".into(),
                ));
            }
            check_ids(it.ids, vocab)?;
        }
        let total: usize = items.iter().map(|it| it.ids.len()).sum();
        if total > MAX_CHUNK {
            return items
                .iter_mut()
                .map(|it| self.forward(it.seq, it.ids, it.want))
                .collect();
        }
        let mut hidden: Option<Vec<f32>> = None;
        for (i, stage) in self.stages.iter().enumerate() {
            let mut part: Vec<BatchItem> = items
                .iter_mut()
                .map(|it| BatchItem {
                    seq: &mut it.seq.stages[i],
                    ids: it.ids,
                    want: it.want,
                })
                .collect();
            match stage.run_part(&mut part, hidden.as_deref())? {
                PartOut::Hidden(h) => hidden = Some(h),
                PartOut::Logits(l) => return Ok(l),
            }
        }
        Err(Error::Unsupported(
            "a pipeline whose last stage has no head".into(),
        ))
    }
}

impl Engine for Pipeline {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> String {
        let gpus: Vec<String> = self
            .stages
            .iter()
            .map(|s| format!("cuda:{}", s.gpu.ordinal))
            .collect();
        format!(
            "{} ({} stages, {})",
            gpus.join(","),
            self.stages.len(),
            self.stages[0].gpu.name
        )
    }

    fn new_state(&self) -> dsv4_core::Result<EngineState> {
        Ok(Box::new(self.new_seq()?))
    }

    fn forward(
        &self,
        state: &mut EngineState,
        ids: &[u32],
        want: Logits,
    ) -> dsv4_core::Result<Vec<f32>> {
        let seq = state
            .downcast_mut::<PipeSeq>()
            .ok_or_else(|| dsv4_core::Error::Input("sequence state of another backend".into()))?;
        Ok(Pipeline::forward(self, seq, ids, want)?)
    }
}

#[cfg(test)]
mod tests {
    use super::split_layers;
    use crate::model::part_config;
    use dsv4_core::synthetic::demo_config;

    #[test]
    fn stage_configs_hold_their_layers_kinds() {
        // The demo's 4 layers: sliding, CSA 4, HCA 16, CSA 4; layer 0 hash-routed.
        let c = demo_config();
        let parts: Vec<_> = split_layers(c.num_layers, 2)
            .into_iter()
            .map(|r| part_config(&c, r).unwrap())
            .collect();
        assert_eq!(parts[0].num_layers, 2);
        assert_eq!(parts[0].attn_kinds, c.attn_kinds[..2]);
        assert_eq!(parts[1].attn_kinds, c.attn_kinds[2..]);
        assert_eq!(parts[0].mlp_kinds, c.mlp_kinds[..2]);
        assert_eq!(parts[1].mlp_kinds, c.mlp_kinds[2..]);
        assert!(part_config(&c, 3..5).is_err());
        assert!(part_config(&c, 2..2).is_err());
    }

    #[test]
    fn layer_ranges_cover_the_model_in_order() {
        assert_eq!(split_layers(43, 2), vec![0..21, 21..43]);
        assert_eq!(split_layers(43, 4), vec![0..10, 10..21, 21..32, 32..43]);
        assert_eq!(split_layers(3, 8), vec![0..1, 1..2, 2..3]);
        assert_eq!(split_layers(5, 1), vec![0..5]);
    }
}
