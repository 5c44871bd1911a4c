//! The serving forward pass: packed weights with fused q/k/v and gate/up projections,
//! preallocated per-sequence KV caches, and one flattened batch per step in which every
//! sequence brings its own tokens (a prompt chunk or one decode token) and its own adapter.
//!
//! It computes what [`Llama::forward_cached`] computes (the candle path stays as the
//! reference and for training), without a tensor allocation per operation: activations live
//! in a reused [`Workspace`], matmuls run on [`QMatrix`] kernels and attention reads the cache
//! in place.

use rayon::prelude::*;

use super::{Llama, LlamaConfig};
use crate::error::{AdapterError, Result};
use crate::kernels::{axpy, dot, QMatrix};
use crate::lora::{AdapterWeights, BaseWeight};
use crate::peft::LoraModule;

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
    embed: QMatrix,
    lm_head: QMatrix,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    pool: rayon::ThreadPool,
}

/// One sequence's keys and values for every layer, allocated once for its whole length.
/// Layout: `[layer][position][kv_head · head_dim]`.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    capacity: usize,
    kv_dim: usize,
}

impl KvCache {
    /// Room for `capacity` tokens. The zeroed memory is only touched (and so only resident)
    /// as tokens arrive.
    pub fn new(config: &LlamaConfig, capacity: usize) -> Self {
        let kv_dim = config.num_kv_heads * config.head_dim;
        let n = config.num_layers * capacity * kv_dim;
        Self { k: vec![0.0; n], v: vec![0.0; n], len: 0, capacity, kv_dim }
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

    fn at(&self, layer: usize, pos: usize) -> usize {
        (layer * self.capacity + pos) * self.kv_dim
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
    })
}

fn to_matrix(t: &candle_core::Tensor) -> Result<QMatrix> {
    let (rows, cols) = t.dims2()?;
    Ok(QMatrix::dense(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?, rows, cols))
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

fn silu_mul(gate_up: &[f32], inter: usize, act: &mut [f32]) {
    for (gu, a) in gate_up.chunks_exact(2 * inter).zip(act.chunks_exact_mut(inter)) {
        let (g, u) = gu.split_at(inter);
        for ((o, &g), &u) in a.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// Adds each sequence's LoRA delta for `module` to its rows of `out` (row stride `ldy`,
/// starting at column `col0`).
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
    for (s, &start) in seqs.iter().zip(starts) {
        if let Some(pair) = s.adapter.and_then(|a| a.pair(layer, module)) {
            let t = s.tokens.len();
            pair.add_delta_rows(&input[start * in_dim..(start + t) * in_dim], t, &mut out[start * ldy..], ldy, col0);
        }
    }
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
        // rather than keeping a second, dense copy.
        let embed = if model.tied { lm_head.clone() } else { to_matrix(&model.embed)? };
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
            .build()
            .map_err(|e| AdapterError::invalid(format!("thread pool: {e}")))?;
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

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize =
            self.layers.iter().map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes()).sum();
        layers + self.lm_head.bytes() + if self.embed.bytes() == self.lm_head.bytes() { 0 } else { self.embed.bytes() }
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
                return Err(AdapterError::invalid("a sequence in the step has no tokens"));
            }
            if s.cache.len + s.tokens.len() > s.cache.capacity {
                return Err(AdapterError::invalid(format!(
                    "a sequence needs {} positions but its cache holds {}",
                    s.cache.len + s.tokens.len(),
                    s.cache.capacity
                )));
            }
            if s.cache.len + s.tokens.len() > self.config.max_position {
                return Err(AdapterError::invalid("a sequence is longer than the model's context"));
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                return Err(AdapterError::invalid(format!("token id {t} is outside the vocabulary")));
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
            self.embed.row_into(t as usize, &mut x[row * hs..(row + 1) * hs]);
        }
        grow(&mut ws.h, n * hs);
        grow(&mut ws.qkv, n * wqkv);
        grow(&mut ws.att, n * dq);
        grow(&mut ws.tmp, n * hs);
        grow(&mut ws.gate_up, n * 2 * inter);
        grow(&mut ws.act, n * inter);
        let half = hd / 2;

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention.
            rms_norm(&ws.x[..n * hs], &layer.attn_norm, eps, &mut ws.h[..n * hs]);
            layer.qkv.matmul(&ws.h, n, &mut ws.qkv, wqkv);
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
                    s.cache.k[at..at + dkv].copy_from_slice(&row[dq..dq + dkv]);
                    s.cache.v[at..at + dkv].copy_from_slice(&row[dq + dkv..]);
                }
            }
            self.attention(l, seqs, &starts, &ws.qkv, wqkv, &mut ws.att);
            layer.o.matmul(&ws.att, n, &mut ws.tmp, hs);
            lora(seqs, &starts, l, LoraModule::OProj, &ws.att, dq, &mut ws.tmp, hs, 0);
            for (xv, tv) in ws.x[..n * hs].iter_mut().zip(&ws.tmp[..n * hs]) {
                *xv += tv;
            }
            // Feed-forward.
            rms_norm(&ws.x[..n * hs], &layer.ffn_norm, eps, &mut ws.h[..n * hs]);
            layer.gate_up.matmul(&ws.h, n, &mut ws.gate_up, 2 * inter);
            lora(seqs, &starts, l, LoraModule::GateProj, &ws.h, hs, &mut ws.gate_up, 2 * inter, 0);
            lora(seqs, &starts, l, LoraModule::UpProj, &ws.h, hs, &mut ws.gate_up, 2 * inter, inter);
            silu_mul(&ws.gate_up[..n * 2 * inter], inter, &mut ws.act[..n * inter]);
            layer.down.matmul(&ws.act, n, &mut ws.tmp, hs);
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
    fn attention(&self, layer: usize, seqs: &[SeqInput<'_>], starts: &[usize], qkv: &[f32], wqkv: usize, att: &mut [f32]) {
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
                    if scores.len() < keys {
                        scores.resize(keys, 0.0);
                    }
                    let row = starts[si] + j;
                    for r in 0..rep {
                        let h = g * rep + r;
                        let q = &qkv[row * wqkv + h * hd..row * wqkv + (h + 1) * hd];
                        let mut max = f32::NEG_INFINITY;
                        for (p, sc) in scores[..keys].iter_mut().enumerate() {
                            let k = &cache.k[cache.at(layer, p) + g * hd..][..hd];
                            *sc = dot(q, k) * scale;
                            max = max.max(*sc);
                        }
                        let mut sum = 0f32;
                        for sc in scores[..keys].iter_mut() {
                            *sc = (*sc - max).exp();
                            sum += *sc;
                        }
                        let inv = 1.0 / sum;
                        // SAFETY: row `row`, head `h` is written by this task only, and lies
                        // inside `att` (`n · dq` floats).
                        let dst = unsafe { std::slice::from_raw_parts_mut(out.at(row * dq + h * hd), hd) };
                        dst.fill(0.0);
                        for (p, &sc) in scores[..keys].iter().enumerate() {
                            let v = &cache.v[cache.at(layer, p) + g * hd..][..hd];
                            axpy(sc * inv, v, dst);
                        }
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
