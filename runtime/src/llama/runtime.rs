//! The serving forward pass: packed weights with fused q/k/v and gate/up projections,
//! preallocated per-sequence KV caches, and one flattened batch per step in which every
//! sequence brings its own tokens (a prompt chunk or one decode token) and its own adapter.
//!
//! It computes what [`Llama::forward_cached`] computes (the candle path stays as the
//! reference and for training), without a tensor allocation per operation: activations live
//! in a reused [`Workspace`], matmuls run on [`QMatrix`] kernels and attention reads the cache
//! in place.

use adapters::LoraModule;
use rayon::prelude::*;

use super::{Llama, LlamaConfig};
use crate::error::{Result, RuntimeError};
use crate::kernels::{axpy, dot, prefetch, x_a_t, Activations, LowRank, QMatrix, Served, PREFETCH_L2, XA_ROWS};
use crate::lora::{AdapterWeights, BaseWeight, LoraPair};

/// Query tokens per attention task during prefill.
const ATTN_CHUNK: usize = 16;

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// Rows: q (`heads·hd`), then k and v (`kv_heads·hd` each).
    qkv: QMatrix,
    o: QMatrix,
    /// Rows: gate (`intermediate`), then up.
    gate_up: QMatrix,
    down: QMatrix,
}

/// The model as the serving path holds it. Immutable and shared; per-step state lives in a
/// [`Workspace`] and per-sequence state in a [`KvCache`].
#[derive(Debug)]
pub struct Runtime {
    pub config: LlamaConfig,
    /// `None` when the embeddings are tied: tokens are looked up in `lm_head`.
    embed: Option<QMatrix>,
    lm_head: QMatrix,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    pool: rayon::ThreadPool,
}

/// One sequence's keys and values for every layer, allocated once for its whole length.
/// Values: `[layer][position][kv_head · head_dim]`. Keys are stored transposed within blocks
/// of 16 positions, `[layer][position / 16][kv_head · head_dim][16]`, so a query's scores over
/// 16 positions are `head_dim` vector updates along positions rather than one short dot
/// product (and one horizontal sum) per position, and read one contiguous run of memory
/// (fully transposed rows put each component a whole context apart, one stream per
/// component, which the prefetchers could not follow).
#[derive(Debug)]
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    capacity: usize,
    kv_dim: usize,
    layers: usize,
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
    fn at(&self, layer: usize, pos: usize) -> usize {
        (layer * self.capacity + pos) * self.kv_dim
    }

    /// Offset in `k` of a layer's block `pb` of [`KEY_BLOCK`] positions: for each key
    /// component `j` (over `kv_head · head_dim`), those positions' values, contiguous.
    fn key_block(&self, layer: usize, pb: usize) -> usize {
        (layer * self.capacity.div_ceil(KEY_BLOCK) + pb) * self.kv_dim * KEY_BLOCK
    }

    /// Offset in `k` of key component `j` at position `pos`.
    fn key_at(&self, layer: usize, j: usize, pos: usize) -> usize {
        self.key_block(layer, pos / KEY_BLOCK) + j * KEY_BLOCK + pos % KEY_BLOCK
    }
}

/// One sequence's part of a step.
#[derive(Debug)]
pub struct SeqInput<'a> {
    /// The tokens to append: a prompt chunk, or the one token sampled last.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a AdapterWeights>,
    /// Whether to compute logits for the last of `tokens` (not needed mid-prompt).
    pub logits: bool,
}

/// Activation buffers reused from step to step.
#[derive(Debug, Default)]
pub struct Workspace {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    last: Vec<f32>,
    /// `x Aᵀ` of each LoRA term of the current matmul.
    lora_t: Vec<Vec<f32>>,
    /// `t·Bᵀ` of the current matmul's LoRA terms, on a decode step of a few rows
    /// ([`QMatrix::matmul_plus_prepared`]).
    lora_delta: Vec<f32>,
}

fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

fn dense_or_packed(w: &BaseWeight) -> Result<QMatrix> {
    Ok(match w {
        BaseWeight::Quantized(q) => match q.as_ref() {
            candle_core::quantized::QMatMul::QTensor(t) => QMatrix::from_qtensor(t)?,
            _ => to_matrix(&w.to_dense()?)?,
        },
        BaseWeight::Dense(t) => to_matrix(t)?,
        BaseWeight::Frozen(f) => f.packed().clone(),
    })
}

fn to_matrix(t: &candle_core::Tensor) -> Result<QMatrix> {
    let (rows, cols) = t.dims2()?;
    Ok(QMatrix::dense(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?, rows, cols))
}

/// A row stride of at least `width` floats that is not a multiple of 4 KiB.
fn padded_stride(width: usize) -> usize {
    if (width * 4).is_multiple_of(4096) {
        width + 16
    } else {
        width
    }
}

fn vec1(t: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = dot(xr, xr) / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// Rotate-half RoPE of one head in place, at the position whose tables are `cos`/`sin`.
fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (a, b) = head.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// `act[i] = silu(gate[i]) · up[i]` for each row of `gate_up` (stride `ldg`, gate then up).
fn silu_mul(gate_up: &[f32], ldg: usize, inter: usize, act: &mut [f32]) {
    for (gu, a) in gate_up.chunks(ldg).zip(act.chunks_exact_mut(inter)) {
        let (g, u) = gu[..2 * inter].split_at(inter);
        for ((o, &g), &u) in a.iter_mut().zip(g).zip(u) {
            *o = silu(g) * u;
        }
    }
}

/// `g·σ(g)` through [`exp_nonpositive`] (vectorizable; libm's `expf` is a call per element, and
/// a slow one when it overflows): `σ(g) = 1/(1+e^-g)` for `g ≥ 0`, `e^g/(1+e^g)` below.
#[inline]
fn silu(g: f32) -> f32 {
    let e = exp_nonpositive(-g.abs());
    let sigma = if g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
    g * sigma
}

/// From this many multiply-adds, a matmul's `x Aᵀ` products are spread over the pool (below
/// it, waking the other threads costs more than the arithmetic).
const PARALLEL_XA: usize = 1 << 16;

/// The LoRA terms of one fused matmul: for every run of consecutive sequences that share an
/// adapter and every module in `modules` (with the output column its slice of the fused matrix
/// starts at), `t = x Aᵀ` for those rows (computed here, into `bufs`) and `scale·Bᵀ`, which
/// the matmul adds (in its tiles, or in one task on a step of a few rows: see
/// [`QMatrix::matmul_plus_prepared`]). Pairs that are not frozen are left to [`lora`].
/// `next`, if given, names the layer and modules of the following LoRA matmul, whose halves
/// are prefetched (see [`prefetch_next`]).
#[allow(clippy::too_many_arguments)]
fn low_rank_terms<'a>(
    seqs: &[SeqInput<'a>],
    starts: &[usize],
    layer: usize,
    modules: &[(LoraModule, usize)],
    input: &[f32],
    in_dim: usize,
    bufs: &'a mut Vec<Vec<f32>>,
    next: Option<(usize, &[LoraModule])>,
) -> Vec<LowRank<'a>> {
    /// One term before its `t` exists.
    struct Spec<'a> {
        row0: usize,
        rows: usize,
        col0: usize,
        rank: usize,
        cols: usize,
        panels: Served<'a>,
        a: Served<'a>,
    }
    let mut specs: Vec<Spec<'a>> = Vec::new();
    for &(module, col0) in modules {
        let first = specs.len();
        for (s, &start) in seqs.iter().zip(starts) {
            let Some(adapter) = s.adapter else { continue };
            let Some((rank, cols, panels, a)) = adapter.pair(layer, module).and_then(|p| p.halves()) else { continue };
            // Sequences next to each other on the same adapter share one term, so its A and B
            // are read once for all their rows.
            if let Some(last) = specs[first..].last_mut() {
                if std::ptr::eq(last.a.as_ptr(), a.as_ptr()) && last.row0 + last.rows == start {
                    last.rows += s.tokens.len();
                    continue;
                }
            }
            specs.push(Spec { row0: start, rows: s.tokens.len(), col0, rank, cols, panels, a });
        }
    }
    if specs.is_empty() {
        return Vec::new();
    }
    // The next matmul's A and B halves travel to L2 while this thread works and the others
    // run this matmul's tiles.
    if let Some((layer, modules)) = next {
        prefetch_next(seqs, layer, modules);
    }
    while bufs.len() < specs.len() {
        bufs.push(Vec::new());
    }
    for (buf, spec) in bufs.iter_mut().zip(&specs) {
        buf.clear();
        buf.resize(spec.rows * spec.rank, 0.0);
    }
    let work: usize = specs.iter().map(|s| s.rows * s.rank).sum::<usize>() * in_dim;
    let fill = |spec: &Spec<'_>, row: usize, t: &mut [f32]| {
        let x = &input[(spec.row0 + row) * in_dim..];
        x_a_t(x, in_dim, t.len() / spec.rank, spec.a, spec.rank, t);
    };
    if work >= PARALLEL_XA {
        specs.par_iter().zip(bufs.par_iter_mut()).for_each(|(spec, buf)| {
            buf[..spec.rows * spec.rank]
                .par_chunks_mut(XA_ROWS * spec.rank)
                .enumerate()
                .for_each(|(c, t)| fill(spec, c * XA_ROWS, t));
        });
    } else {
        for (spec, buf) in specs.iter().zip(bufs.iter_mut()) {
            for (c, t) in buf[..spec.rows * spec.rank].chunks_mut(XA_ROWS * spec.rank).enumerate() {
                fill(spec, c * XA_ROWS, t);
            }
        }
    }
    let bufs: &'a Vec<Vec<f32>> = bufs;
    specs
        .into_iter()
        .enumerate()
        .map(|(i, s)| LowRank {
            row0: s.row0,
            rows: s.rows,
            col0: s.col0,
            cols: s.cols,
            rank: s.rank,
            t: &bufs[i],
            panels: s.panels,
        })
        .collect()
}

/// Asks for the A and B halves of `modules` in `layer` of every adapter in the step to be
/// brought into L2 ahead of their matmul (the next one), by the thread that has just worked
/// out this matmul's LoRA terms while the others run its tiles. On a few rows the LoRA work
/// is a short pass over A and one over B, which would otherwise wait on memory.
fn prefetch_next(seqs: &[SeqInput<'_>], layer: usize, modules: &[LoraModule]) {
    let mut last: Option<*const AdapterWeights> = None;
    for adapter in seqs.iter().filter_map(|s| s.adapter) {
        if last == Some(adapter as *const _) {
            continue;
        }
        last = Some(adapter as *const _);
        for &module in modules {
            if let Some((_, _, b, a)) = adapter.pair(layer, module).and_then(|p| p.halves()) {
                prefetch::<{ PREFETCH_L2 }>(a, 0..a.len());
                prefetch::<{ PREFETCH_L2 }>(b, 0..b.len());
            }
        }
    }
}

/// Up to this many rows in a step, the whole LoRA delta (`x·Aᵀ`, then `t·Bᵀ`) is computed as
/// one task of the base matmul's parallel region ([`QMatrix::matmul_plus_prepared`]) instead
/// of before it and in its tiles.
const PREPARED_ROWS: usize = 4;

/// `out = input · Wᵀ` plus the frozen LoRA terms of `modules` for every sequence; `next`
/// names the layer and modules of the following LoRA matmul, whose A and B halves are
/// prefetched on prepared steps only: larger steps spread their LoRA work over the tiles,
/// where the hardware prefetchers follow each panel, and asking for several adapters' halves
/// stalled on the prefetches themselves (2.5% of a sixteen-stream, eight-adapter profile).
#[allow(clippy::too_many_arguments)]
fn lora_matmul(
    w: &QMatrix,
    seqs: &[SeqInput<'_>],
    starts: &[usize],
    layer: usize,
    modules: &[(LoraModule, usize)],
    input: &[f32],
    in_dim: usize,
    n: usize,
    out: &mut [f32],
    ldy: usize,
    bufs: &mut Vec<Vec<f32>>,
    delta: &mut Vec<f32>,
    prepared: bool,
    next: (usize, &[LoraModule]),
) {
    if prepared {
        w.matmul_plus_prepared(input, n, out, ldy, delta, || {
            low_rank_terms(seqs, starts, layer, modules, input, in_dim, bufs, Some(next))
        });
    } else {
        let terms = low_rank_terms(seqs, starts, layer, modules, input, in_dim, bufs, None);
        w.matmul_plus(input, n, out, ldy, &terms);
    }
}

/// Adds each sequence's LoRA delta for `module` to its rows of `out` (row stride `ldy`,
/// starting at column `col0`), for pairs that are not frozen (frozen ones go through
/// [`low_rank_terms`]).
#[allow(clippy::too_many_arguments)]
fn lora(
    seqs: &[SeqInput<'_>],
    starts: &[usize],
    layer: usize,
    module: LoraModule,
    input: &[f32],
    in_dim: usize,
    out: &mut [f32],
    ldy: usize,
    col0: usize,
) {
    let jobs: Vec<(usize, usize, &LoraPair)> = seqs
        .iter()
        .zip(starts)
        .filter_map(|(s, &start)| {
            s.adapter.and_then(|a| a.pair(layer, module)).filter(|p| !p.is_frozen()).map(|p| (start, s.tokens.len(), p))
        })
        .collect();
    let run = |&(start, t, pair): &(usize, usize, &LoraPair), out: &mut [f32]| {
        pair.add_delta_rows(&input[start * in_dim..(start + t) * in_dim], t, out, ldy, col0);
    };
    match jobs.as_slice() {
        [] => {}
        [one] => run(one, &mut out[one.0 * ldy..]),
        _ => {
            // Sequences own disjoint rows of `out`, so their deltas can run side by side.
            let ptr = SharedMut(out.as_mut_ptr());
            let len = out.len();
            jobs.par_iter().for_each(|job| {
                let (start, t) = (job.0, job.1);
                let end = ((start + t) * ldy).min(len);
                // SAFETY: rows start..start + t belong to this sequence alone, and lie in `out`.
                let rows = unsafe { std::slice::from_raw_parts_mut(ptr.at(start * ldy), end - start * ldy) };
                run(job, rows);
            });
        }
    }
}

/// One kv head of one layer of one sequence's cache, seen by the query heads that share it.
struct GroupView<'a> {
    cache: &'a KvCache,
    layer: usize,
    group: usize,
    keys: usize,
    hd: usize,
}

/// Key positions (and value components) per register block in the attention loops.
const KEY_BLOCK: usize = 16;

/// The scores of `R` (scaled) query heads against one block of 16 key positions (`kb`:
/// component `d`'s 16 values at `d·16`), the partial sums in registers. `FUSED` sums with
/// FMAs (whole blocks); otherwise each product is rounded before it is added (the partial last
/// block, whose positions were once summed one by one that way: keeping their bits keeps
/// greedy answers as they were).
#[inline(always)]
fn score_block<const R: usize, const HD: usize, const FUSED: bool>(
    kb: &[f32],
    qs: &[[f32; HD]; R],
) -> [[f32; KEY_BLOCK]; R] {
    let mut acc = [[if FUSED { 0.0 } else { -0.0f32 }; KEY_BLOCK]; R];
    for d in 0..HD {
        let k: &[f32; KEY_BLOCK] = kb[d * KEY_BLOCK..(d + 1) * KEY_BLOCK].try_into().expect("a whole block");
        for r in 0..R {
            let qd = qs[r][d];
            for l in 0..KEY_BLOCK {
                acc[r][l] = if FUSED { qd.mul_add(k[l], acc[r][l]) } else { acc[r][l] + qd * k[l] };
            }
        }
    }
    acc
}

impl GroupView<'_> {
    /// This group's keys at positions `pb·16 .. pb·16 + 16`: component `d`'s 16 values at
    /// `d·16` (one contiguous run of `head_dim · 16` floats).
    fn key_block(&self, pb: usize) -> &[f32] {
        let (k, stride) = self.keys_from_start();
        &k[pb * stride..][..self.hd * KEY_BLOCK]
    }

    fn value(&self, p: usize) -> &[f32] {
        let (v, stride) = self.values_from_start();
        &v[p * stride..][..self.hd]
    }

    /// `R` query heads of width `HD` (`q` is `R·HD`) over the group's keys into `dst` (`R·HD`).
    /// Scores are built 16 positions at a time with the `R` partial sums in registers, and the
    /// values 16 components at a time, so neither loop stores and reloads partial results.
    /// With AVX-512 and width 64, kernels do both halves 16 lanes a register, four key blocks a
    /// pass and all 64 value components a pass, with the same bits.
    fn attend<const R: usize, const HD: usize>(&self, q: &[f32], scale: f32, scores: &mut Vec<f32>, dst: &mut [f32]) {
        let keys = self.keys;
        if scores.len() < R * keys {
            scores.resize(R * keys, 0.0);
        }
        let mut qs = [[0f32; HD]; R];
        for (r, qr) in qs.iter_mut().enumerate() {
            for (d, v) in qr.iter_mut().enumerate() {
                *v = q[r * HD + d] * scale;
            }
        }
        let (k, k_stride) = self.keys_from_start();
        if !(HD == 64 && crate::kernels::attention_scores_64::<R>(k, k_stride, qs.as_flattened(), keys, scores)) {
            self.scores_portable::<R, HD>(&qs, scores);
        }
        let mut inv = [0f32; R];
        for (r, i) in inv.iter_mut().enumerate() {
            *i = 1.0 / softmax_numerators(&mut scores[r * keys..(r + 1) * keys]);
        }
        for (r, &i) in inv.iter().enumerate() {
            for sc in &mut scores[r * keys..(r + 1) * keys] {
                *sc *= i;
            }
        }
        let (v, v_stride) = self.values_from_start();
        if !(HD == 64 && crate::kernels::attention_values_64::<R>(v, v_stride, scores, keys, dst)) {
            self.values_portable::<R, HD>(scores, dst);
        }
    }

    /// This group's key blocks from the first on, and the floats from one block to the next.
    fn keys_from_start(&self) -> (&[f32], usize) {
        let at = self.cache.key_block(self.layer, 0) + self.group * self.hd * KEY_BLOCK;
        (&self.cache.k[at..], self.cache.kv_dim * KEY_BLOCK)
    }

    /// This group's values from position 0 on, and the floats from one position to the next.
    fn values_from_start(&self) -> (&[f32], usize) {
        (&self.cache.v[self.cache.at(self.layer, 0) + self.group * self.hd..], self.cache.kv_dim)
    }

    /// The scores of [`Self::attend`] with portable code (what the AVX-512 kernel matches bit
    /// for bit).
    fn scores_portable<const R: usize, const HD: usize>(&self, qs: &[[f32; HD]; R], scores: &mut [f32]) {
        let keys = self.keys;
        let whole = keys / KEY_BLOCK * KEY_BLOCK;
        for p0 in (0..whole).step_by(KEY_BLOCK) {
            for (r, a) in score_block::<R, HD, true>(self.key_block(p0 / KEY_BLOCK), qs).iter().enumerate() {
                scores[r * keys + p0..r * keys + p0 + KEY_BLOCK].copy_from_slice(a);
            }
        }
        // The last, partial block as a block too, with the same roundings as the scalar sums it
        // replaces: its memory is whole (blocks are allocated whole), and the lanes past `keys`
        // are computed and dropped. One 64-long chain of dependent adds per position took more
        // than half of attention's time at sixteen streams over HTTP.
        if whole < keys {
            for (r, a) in score_block::<R, HD, false>(self.key_block(whole / KEY_BLOCK), qs).iter().enumerate() {
                scores[r * keys + whole..(r + 1) * keys].copy_from_slice(&a[..keys - whole]);
            }
        }
    }

    /// The weighted values of [`Self::attend`] with portable code, 16 components a pass.
    fn values_portable<const R: usize, const HD: usize>(&self, scores: &[f32], dst: &mut [f32]) {
        let keys = self.keys;
        for d0 in (0..HD).step_by(KEY_BLOCK) {
            let mut acc = [[0f32; KEY_BLOCK]; R];
            for p in 0..keys {
                let v: &[f32; KEY_BLOCK] = self.value(p)[d0..d0 + KEY_BLOCK].try_into().expect("16 components");
                for r in 0..R {
                    let w = scores[r * keys + p];
                    for l in 0..KEY_BLOCK {
                        acc[r][l] = w.mul_add(v[l], acc[r][l]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                dst[r * HD + d0..r * HD + d0 + KEY_BLOCK].copy_from_slice(a);
            }
        }
    }

    /// The same for any number of heads and head width, with plain vector updates.
    fn attend_any(&self, rep: usize, q: &[f32], scale: f32, scores: &mut Vec<f32>, dst: &mut [f32]) {
        let (keys, hd) = (self.keys, self.hd);
        if scores.len() < rep * keys {
            scores.resize(rep * keys, 0.0);
        }
        let sc = &mut scores[..rep * keys];
        sc.fill(0.0);
        for p0 in (0..keys).step_by(KEY_BLOCK) {
            let (kb, width) = (self.key_block(p0 / KEY_BLOCK), KEY_BLOCK.min(keys - p0));
            for d in 0..hd {
                for (r, head) in sc.chunks_exact_mut(keys).enumerate() {
                    axpy(q[r * hd + d] * scale, &kb[d * KEY_BLOCK..d * KEY_BLOCK + width], &mut head[p0..p0 + width]);
                }
            }
        }
        let inv: Vec<f32> = sc.chunks_exact_mut(keys).map(|head| 1.0 / softmax_numerators(head)).collect();
        dst.fill(0.0);
        for p in 0..keys {
            let v = self.value(p);
            for (r, head) in dst.chunks_exact_mut(hd).enumerate() {
                axpy(sc[r * keys + p] * inv[r], v, head);
            }
        }
    }
}

/// Replaces scores by `exp(score - max)` and returns their sum (softmax without the division).
fn softmax_numerators(v: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for x in v.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    let mut sums = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (s, &x) in sums.iter_mut().zip(c) {
            *s += x;
        }
    }
    sums.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `e^x` for `x ≤ 0`, written so the compiler vectorizes it: Cody–Waite range reduction to
/// `|r| ≤ ln2/2` and a degree-7 Taylor polynomial (relative error below 2e-8 before rounding,
/// i.e. within an ulp of libm); inputs below -87 flush to the smallest normal scale.
#[inline]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let n = (x * LOG2E).round();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p: f32 = 1.0 / 5040.0;
    p = p.mul_add(r, 1.0 / 720.0);
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: attention tasks write disjoint (row, head) slices through it.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method, so closures capture the whole wrapper (which is `Sync`), not the
    /// raw pointer field.
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Runtime {
    /// Packs `model`'s weights for serving; `threads` sizes the matmul pool (0: every core).
    pub fn from_llama(model: &Llama, threads: usize) -> Result<Self> {
        let cfg = model.config.clone();
        let lm_head = dense_or_packed(&model.lm_head)?;
        // Tied embeddings (the GGUF has no output.weight): look tokens up in the packed head
        // rather than keeping a second copy.
        let embed = if model.tied { None } else { Some(to_matrix(&model.embed)?) };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for block in &model.blocks {
            let m = |module: LoraModule| -> Result<QMatrix> {
                let idx = LoraModule::ALL.iter().position(|x| *x == module).unwrap_or(0);
                dense_or_packed(&block.proj[idx].base)
            };
            let (q, k, v) = (m(LoraModule::QProj)?, m(LoraModule::KProj)?, m(LoraModule::VProj)?);
            let (gate, up) = (m(LoraModule::GateProj)?, m(LoraModule::UpProj)?);
            layers.push(Layer {
                attn_norm: vec1(&block.attn_norm)?,
                ffn_norm: vec1(&block.ffn_norm)?,
                qkv: QMatrix::concat_rows(&[&q, &k, &v]),
                o: m(LoraModule::OProj)?,
                gate_up: QMatrix::concat_rows(&[&gate, &up]),
                down: m(LoraModule::DownProj)?,
            });
        }
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("switchyard-matmul-{i}"))
            .build()?;
        Ok(Self {
            norm: vec1(&model.norm)?,
            cos: vec1(&model.cos)?,
            sin: vec1(&model.sin)?,
            config: cfg,
            embed,
            lm_head,
            layers,
            pool,
        })
    }

    /// Chooses what every packed matrix's decode steps multiply against (see
    /// [`Activations`]); the default, f32, is exact up to the order of additions.
    pub fn set_activations(&mut self, activations: Activations) {
        for layer in &mut self.layers {
            for w in [&mut layer.qkv, &mut layer.o, &mut layer.gate_up, &mut layer.down] {
                w.set_activations(activations);
            }
        }
        self.lm_head.set_activations(activations);
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize =
            self.layers.iter().map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes()).sum();
        layers + self.lm_head.bytes() + self.embed.as_ref().map_or(0, QMatrix::bytes)
    }

    /// Threads the matmuls are split across.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs one step: appends every sequence's tokens to its cache and writes, for each
    /// sequence that asks, the logits of its last token into `logits` (`vocab` floats each,
    /// in input order).
    pub fn forward(&self, ws: &mut Workspace, seqs: &mut [SeqInput<'_>], logits: &mut Vec<f32>) -> Result<()> {
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                return Err(RuntimeError::invalid_step("a sequence in the step has no tokens"));
            }
            if s.cache.len + s.tokens.len() > s.cache.capacity {
                return Err(RuntimeError::invalid_step(format!(
                    "a sequence needs {} positions but its cache holds {}",
                    s.cache.len + s.tokens.len(),
                    s.cache.capacity
                )));
            }
            if s.cache.len + s.tokens.len() > self.config.max_position {
                return Err(RuntimeError::invalid_step("a sequence is longer than the model's context"));
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                return Err(RuntimeError::invalid_step(format!("token id {t} is outside the vocabulary")));
            }
        }
        self.pool.install(|| self.forward_inner(ws, seqs, logits));
        Ok(())
    }

    fn forward_inner(&self, ws: &mut Workspace, seqs: &mut [SeqInput<'_>], logits: &mut Vec<f32>) {
        let cfg = &self.config;
        let (hs, hd, nh, nkv, inter) =
            (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size);
        let (dq, dkv) = (nh * hd, nkv * hd);
        let wqkv = dq + 2 * dkv;
        let eps = cfg.rms_eps as f32;
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let starts: Vec<usize> = seqs
            .iter()
            .scan(0, |acc, s| {
                let at = *acc;
                *acc += s.tokens.len();
                Some(at)
            })
            .collect();

        let x = grow(&mut ws.x, n * hs);
        for (row, &t) in seqs.iter().flat_map(|s| s.tokens.iter()).enumerate() {
            self.embed.as_ref().unwrap_or(&self.lm_head).row_into(t as usize, &mut x[row * hs..(row + 1) * hs]);
        }
        grow(&mut ws.h, n * hs);
        grow(&mut ws.qkv, n * wqkv);
        grow(&mut ws.att, n * dq);
        grow(&mut ws.tmp, n * hs);
        // Rows of the gate/up output are padded off a multiple of 4 KiB (SmolLM2's are 12 KiB),
        // so that a store to one row and a load from the next at the same offset do not alias.
        let wgu = padded_stride(2 * inter);
        grow(&mut ws.gate_up, n * wgu);
        grow(&mut ws.act, n * inter);
        let half = hd / 2;

        // A decode step of a few rows works out its whole LoRA delta inside each matmul's region.
        let prepared = n <= PREPARED_ROWS && seqs.iter().any(|s| s.adapter.is_some());
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention.
            rms_norm(&ws.x[..n * hs], &layer.attn_norm, eps, &mut ws.h[..n * hs]);
            lora_matmul(
                &layer.qkv,
                seqs,
                &starts,
                l,
                &[(LoraModule::QProj, 0), (LoraModule::KProj, dq), (LoraModule::VProj, dq + dkv)],
                &ws.h,
                hs,
                n,
                &mut ws.qkv,
                wqkv,
                &mut ws.lora_t,
                &mut ws.lora_delta,
                prepared,
                (l, &[LoraModule::OProj]),
            );
            lora(seqs, &starts, l, LoraModule::QProj, &ws.h, hs, &mut ws.qkv, wqkv, 0);
            lora(seqs, &starts, l, LoraModule::KProj, &ws.h, hs, &mut ws.qkv, wqkv, dq);
            lora(seqs, &starts, l, LoraModule::VProj, &ws.h, hs, &mut ws.qkv, wqkv, dq + dkv);
            for (s, &start) in seqs.iter_mut().zip(&starts) {
                for j in 0..s.tokens.len() {
                    let pos = s.cache.len + j;
                    let (cos, sin) = (&self.cos[pos * half..(pos + 1) * half], &self.sin[pos * half..(pos + 1) * half]);
                    let row = &mut ws.qkv[(start + j) * wqkv..(start + j + 1) * wqkv];
                    for head in row[..dq + dkv].chunks_exact_mut(hd) {
                        rope(head, cos, sin);
                    }
                    let at = s.cache.at(l, pos);
                    s.cache.v[at..at + dkv].copy_from_slice(&row[dq + dkv..]);
                    for (j, &kv) in row[dq..dq + dkv].iter().enumerate() {
                        let at = s.cache.key_at(l, j, pos);
                        s.cache.k[at] = kv;
                    }
                }
            }
            self.attention(l, seqs, &starts, &ws.qkv, wqkv, &mut ws.att);
            lora_matmul(
                &layer.o,
                seqs,
                &starts,
                l,
                &[(LoraModule::OProj, 0)],
                &ws.att,
                dq,
                n,
                &mut ws.tmp,
                hs,
                &mut ws.lora_t,
                &mut ws.lora_delta,
                prepared,
                (l, &[LoraModule::GateProj, LoraModule::UpProj]),
            );
            lora(seqs, &starts, l, LoraModule::OProj, &ws.att, dq, &mut ws.tmp, hs, 0);
            for (xv, tv) in ws.x[..n * hs].iter_mut().zip(&ws.tmp[..n * hs]) {
                *xv += tv;
            }
            // Feed-forward.
            rms_norm(&ws.x[..n * hs], &layer.ffn_norm, eps, &mut ws.h[..n * hs]);
            lora_matmul(
                &layer.gate_up,
                seqs,
                &starts,
                l,
                &[(LoraModule::GateProj, 0), (LoraModule::UpProj, inter)],
                &ws.h,
                hs,
                n,
                &mut ws.gate_up,
                wgu,
                &mut ws.lora_t,
                &mut ws.lora_delta,
                prepared,
                (l, &[LoraModule::DownProj]),
            );
            lora(seqs, &starts, l, LoraModule::GateProj, &ws.h, hs, &mut ws.gate_up, wgu, 0);
            lora(seqs, &starts, l, LoraModule::UpProj, &ws.h, hs, &mut ws.gate_up, wgu, inter);
            silu_mul(&ws.gate_up[..n * wgu], wgu, inter, &mut ws.act[..n * inter]);
            lora_matmul(
                &layer.down,
                seqs,
                &starts,
                l,
                &[(LoraModule::DownProj, 0)],
                &ws.act,
                inter,
                n,
                &mut ws.tmp,
                hs,
                &mut ws.lora_t,
                &mut ws.lora_delta,
                prepared,
                (l + 1, &[LoraModule::QProj, LoraModule::KProj, LoraModule::VProj]),
            );
            lora(seqs, &starts, l, LoraModule::DownProj, &ws.act, inter, &mut ws.tmp, hs, 0);
            for (xv, tv) in ws.x[..n * hs].iter_mut().zip(&ws.tmp[..n * hs]) {
                *xv += tv;
            }
        }
        for s in seqs.iter_mut() {
            s.cache.len += s.tokens.len();
        }

        // The head, only for the rows that need logits.
        let wanted: Vec<usize> =
            seqs.iter().zip(&starts).filter(|(s, _)| s.logits).map(|(s, &st)| st + s.tokens.len() - 1).collect();
        let last = grow(&mut ws.last, wanted.len() * hs);
        for (i, &row) in wanted.iter().enumerate() {
            rms_norm(&ws.x[row * hs..(row + 1) * hs], &self.norm, eps, &mut last[i * hs..(i + 1) * hs]);
        }
        let vocab = cfg.vocab_size;
        logits.clear();
        logits.resize(wanted.len() * vocab, 0.0);
        self.lm_head.matmul(last, wanted.len(), logits, vocab);
    }

    /// Grouped-query attention for every token of the step, reading keys and values from the
    /// caches (which already hold this step's tokens). Tasks are (sequence, kv head, chunk of
    /// queries) and write disjoint parts of `att`.
    fn attention(
        &self,
        layer: usize,
        seqs: &[SeqInput<'_>],
        starts: &[usize],
        qkv: &[f32],
        wqkv: usize,
        att: &mut [f32],
    ) {
        let cfg = &self.config;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let (dq, rep) = (nh * hd, nh / nkv);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut tasks = Vec::new();
        for (si, s) in seqs.iter().enumerate() {
            for g in 0..nkv {
                for c in (0..s.tokens.len()).step_by(ATTN_CHUNK) {
                    tasks.push((si, g, c, (c + ATTN_CHUNK).min(s.tokens.len())));
                }
            }
        }
        let out = SharedMut(att.as_mut_ptr());
        let work = |&(si, g, c0, c1): &(usize, usize, usize, usize)| {
            let s = &seqs[si];
            let cache = &*s.cache;
            // The cache already holds this step's keys, but its length still counts only the
            // tokens before the step (it moves on after the last layer).
            let base = cache.len;
            SCORES.with(|buf| {
                let mut scores = buf.borrow_mut();
                for j in c0..c1 {
                    let keys = base + j + 1;
                    if scores.len() < rep * keys {
                        scores.resize(rep * keys, 0.0);
                    }
                    let row = starts[si] + j;
                    let q0 = row * wqkv + g * rep * hd;
                    let q = &qkv[q0..q0 + rep * hd];
                    // SAFETY: row `row`, heads `g·rep .. (g+1)·rep` are written by this task
                    // only, and lie inside `att` (`n · dq` floats).
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.at(row * dq + g * rep * hd), rep * hd) };
                    let view = GroupView { cache, layer, group: g, keys, hd };
                    match (rep, hd) {
                        (1, 64) => view.attend::<1, 64>(q, scale, &mut scores, dst),
                        (2, 64) => view.attend::<2, 64>(q, scale, &mut scores, dst),
                        (3, 64) => view.attend::<3, 64>(q, scale, &mut scores, dst),
                        (4, 64) => view.attend::<4, 64>(q, scale, &mut scores, dst),
                        _ => view.attend_any(rep, q, scale, &mut scores, dst),
                    }
                }
            });
        };
        if tasks.len() == 1 {
            work(&tasks[0]);
        } else {
            tasks.par_iter().for_each(work);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_libm_within_two_ulp() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -(i as f32) * 87.0 / 200_000.0;
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1000.0) < 1e-37);
    }

    /// A two-layer cache of `capacity` positions for heads of width 64, filled with
    /// deterministic keys and values.
    fn filled_cache(num_heads: usize, num_kv_heads: usize, capacity: usize) -> KvCache {
        let cfg = LlamaConfig {
            vocab_size: 8,
            hidden_size: num_heads * 64,
            intermediate_size: 8,
            num_layers: 2,
            num_heads,
            num_kv_heads,
            head_dim: 64,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position: capacity,
        };
        let mut cache = KvCache::new(&cfg, capacity);
        let vals = crate::testing::values(cache.k.len(), 5, 1.0);
        cache.k.copy_from_slice(&vals);
        let vals = crate::testing::values(cache.v.len(), 6, 1.0);
        cache.v.copy_from_slice(&vals);
        cache
    }

    #[test]
    fn register_blocked_attention_equals_the_plain_one() {
        let cache = filled_cache(3, 1, 120);
        let q = crate::testing::values(3 * 64, 7, 1.0);
        // 37 keys: two whole blocks of 16 and a tail; 100: six blocks and a tail.
        for keys in [37, 100] {
            let view = GroupView { cache: &cache, layer: 1, group: 0, keys, hd: 64 };
            let (mut a, mut b) = (vec![0f32; 192], vec![0f32; 192]);
            let mut scratch = Vec::new();
            view.attend::<3, 64>(&q, 0.125, &mut scratch, &mut a);
            view.attend_any(3, &q, 0.125, &mut scratch, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "{keys} keys: {x} vs {y}");
            }
        }
    }

    fn attention_halves_match<const R: usize>(cache: &KvCache) {
        let q = crate::testing::values(R * 64, 11, 0.3);
        let mut qs = [[0f32; 64]; R];
        for (r, qr) in qs.iter_mut().enumerate() {
            qr.copy_from_slice(&q[r * 64..(r + 1) * 64]);
        }
        for keys in 1..=70 {
            let view = GroupView { cache, layer: 1, group: 1, keys, hd: 64 };
            let (mut fast, mut plain) = (vec![f32::NAN; R * keys], vec![f32::NAN; R * keys]);
            let (k, stride) = view.keys_from_start();
            let used = crate::kernels::attention_scores_64::<R>(k, stride, qs.as_flattened(), keys, &mut fast);
            view.scores_portable::<R, 64>(&qs, &mut plain);
            if !used {
                // No AVX-512 here: the portable loop is the only path, and this test has nothing to compare.
                return;
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&plain), "scores, {R} heads, {keys} keys");
            let w: Vec<f32> = plain.iter().map(|x| x * 0.01).collect();
            let (mut fast, mut plain) = (vec![f32::NAN; R * 64], vec![f32::NAN; R * 64]);
            let (v, stride) = view.values_from_start();
            assert!(crate::kernels::attention_values_64::<R>(v, stride, &w, keys, &mut fast));
            view.values_portable::<R, 64>(&w, &mut plain);
            assert_eq!(bits(&fast), bits(&plain), "values, {R} heads, {keys} keys");
        }
    }

    #[test]
    fn vector_attention_kernels_give_the_portable_bits() {
        // Capacity 75: the last block of the last layer is partial in positions but whole in
        // memory, as the kernels assume.
        let cache = filled_cache(4, 2, 75);
        attention_halves_match::<1>(&cache);
        attention_halves_match::<2>(&cache);
        attention_halves_match::<3>(&cache);
        attention_halves_match::<4>(&cache);
    }

    #[test]
    fn silu_matches_the_libm_formula() {
        for i in -20_000..=20_000 {
            let g = i as f32 * 0.01;
            let want = (g as f64) / (1.0 + (-(g as f64)).exp());
            let got = silu(g) as f64;
            assert!((got - want).abs() <= 1e-6 * want.abs().max(1e-3), "silu({g}) = {got}, want {want}");
        }
        // Far tails: no overflow, no NaN.
        assert_eq!(silu(1000.0), 1000.0);
        assert!(silu(-1000.0).abs() < 1e-30);
    }

    #[test]
    fn softmax_numerators_sum_to_the_total() {
        let mut v: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let want: Vec<f32> = v.iter().map(|x| (x - max).exp()).collect();
        let sum = softmax_numerators(&mut v);
        assert!((sum - want.iter().sum::<f32>()).abs() < 1e-5);
        for (g, w) in v.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6);
        }
    }
}
