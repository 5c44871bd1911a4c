//! One sequence's keys and values for every layer, laid out as attention reads them.

use crate::llama::LlamaConfig;

/// Key positions (and value components) per register block in the attention loops.
pub(super) const KEY_BLOCK: usize = 16;

/// One sequence's keys and values for every layer, allocated once for its whole length.
/// Values: `[layer][position][kv_head · head_dim]`. Keys are stored transposed within blocks
/// of 16 positions, `[layer][position / 16][kv_head · head_dim][16]`, so a query's scores over
/// 16 positions are `head_dim` vector updates along positions rather than one short dot
/// product (and one horizontal sum) per position, and read one contiguous run of memory
/// (fully transposed rows put each component a whole context apart, one stream per
/// component, which the prefetchers could not follow).
#[derive(Debug)]
pub struct KvCache {
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
    pub(super) len: usize,
    pub(super) capacity: usize,
    pub(super) kv_dim: usize,
    pub(super) layers: usize,
}

impl KvCache {
    /// Room for `capacity` tokens. The zeroed memory is only touched (and so only resident)
    /// as tokens arrive.
    pub fn new(config: &LlamaConfig, capacity: usize) -> Self {
        let kv_dim = config.num_kv_heads * config.head_dim;
        let n = config.num_layers * capacity * kv_dim;
        let nk = config.num_layers * capacity.div_ceil(KEY_BLOCK) * KEY_BLOCK * kv_dim;
        Self { k: vec![0.0; nk], v: vec![0.0; n], len: 0, capacity, kv_dim, layers: config.num_layers }
    }

    /// Bytes one position's keys and values take over all layers.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_dim * std::mem::size_of::<f32>()
    }

    /// A cache holding exactly this one's first `len` positions, with room for no more.
    ///
    /// # Panics
    /// If `len` exceeds the positions this cache holds.
    pub fn prefix(&self, len: usize) -> KvCache {
        let n = self.layers * len * self.kv_dim;
        let nk = self.layers * len.div_ceil(KEY_BLOCK) * KEY_BLOCK * self.kv_dim;
        let mut out = KvCache {
            k: vec![0.0; nk],
            v: vec![0.0; n],
            len: 0,
            capacity: len,
            kv_dim: self.kv_dim,
            layers: self.layers,
        };
        out.copy_prefix_from(self, len);
        out
    }

    /// Makes this empty cache's first `len` positions those of `src`, as if the same tokens
    /// had been fed to it: keys and values at a position depend only on the tokens up to it.
    ///
    /// # Panics
    /// If this cache is not empty, the two were made for different models, `src` holds fewer
    /// than `len` positions or this cache has no room for them.
    pub fn copy_prefix_from(&mut self, src: &KvCache, len: usize) {
        assert!(self.len == 0, "a prefix is copied only into an empty cache");
        assert!(self.layers == src.layers && self.kv_dim == src.kv_dim, "caches of different models");
        assert!(len <= src.len && len <= self.capacity, "prefix of {len} positions does not fit");
        for layer in 0..self.layers {
            let (d, s, n) = (self.at(layer, 0), src.at(layer, 0), len * self.kv_dim);
            self.v[d..d + n].copy_from_slice(&src.v[s..s + n]);
            // Whole blocks of positions: past `len`, the copy holds whatever `src` had there,
            // which nothing reads before this cache writes those positions itself.
            let (d, s, n) =
                (self.key_block(layer, 0), src.key_block(layer, 0), len.div_ceil(KEY_BLOCK) * KEY_BLOCK * self.kv_dim);
            self.k[d..d + n].copy_from_slice(&src.k[s..s + n]);
        }
        self.len = len;
    }

    /// Tokens in the cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Offset of a position's values in `v`.
    pub(super) fn at(&self, layer: usize, pos: usize) -> usize {
        (layer * self.capacity + pos) * self.kv_dim
    }

    /// Offset in `k` of a layer's block `pb` of [`KEY_BLOCK`] positions: for each key
    /// component `j` (over `kv_head · head_dim`), those positions' values, contiguous.
    pub(super) fn key_block(&self, layer: usize, pb: usize) -> usize {
        (layer * self.capacity.div_ceil(KEY_BLOCK) + pb) * self.kv_dim * KEY_BLOCK
    }

    /// Offset in `k` of key component `j` at position `pos`.
    pub(super) fn key_at(&self, layer: usize, j: usize, pos: usize) -> usize {
        self.key_block(layer, pos / KEY_BLOCK) + j * KEY_BLOCK + pos % KEY_BLOCK
    }
}
