//! Per-sequence state for incremental decoding. Everything a token contributes depends only on
//! absolute positions, so feeding a prompt in any chunking gives the one-call result.
//! The state is plain data (`Clone`): a snapshot at any point is a prefix cache entry.

/// Compressor state: rows of the open window, emitted entries, and (CSA) the previous window's
/// first halves.
#[derive(Clone, Debug, Default)]
pub struct CompressorState {
    /// Projected kv rows of tokens after the last complete window, `[rows, width]`.
    pub buf_kv: Vec<f32>,
    /// Projected gate rows (without ape), `[rows, width]`.
    pub buf_gate: Vec<f32>,
    /// Emitted entries (normed, rotated), `[n_entries, dim]`.
    pub entries: Vec<f32>,
    pub n_entries: usize,
    /// CSA overlap: the last complete window's A-halves, kv and gate+ape, `[ratio, dim]` each.
    pub overlap: Option<(Vec<f32>, Vec<f32>)>,
}

/// State of one layer.
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    /// Ring buffer of window K=V rows; slot `pos % window`.
    pub window: Vec<f32>,
    pub compressor: Option<CompressorState>,
    pub indexer: Option<CompressorState>,
}

/// The whole state of one sequence.
#[derive(Clone, Debug)]
pub struct SeqCache {
    /// Tokens processed so far (the next token's position).
    pub pos: usize,
    pub layers: Vec<LayerCache>,
}

impl SeqCache {
    /// Bytes held by this sequence's state.
    pub fn bytes(&self) -> usize {
        let comp = |c: &Option<CompressorState>| {
            c.as_ref().map_or(0, |c| {
                (c.buf_kv.len() + c.buf_gate.len() + c.entries.len()) * 4
                    + c.overlap
                        .as_ref()
                        .map_or(0, |(a, b)| (a.len() + b.len()) * 4)
            })
        };
        self.layers
            .iter()
            .map(|l| l.window.len() * 4 + comp(&l.compressor) + comp(&l.indexer))
            .sum()
    }
}
