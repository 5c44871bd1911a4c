//! The serving forward pass: packed weights with fused q/k/v and gate/up projections,
//! preallocated per-sequence KV caches, and one flattened batch per step in which every
//! sequence brings its own tokens (a prompt chunk or one decode token) and its own adapter.
//!
//! It computes what [`Llama::forward_cached`] computes (the candle path stays as the
//! reference and for training), without a tensor allocation per operation: activations live
//! in a reused [`Workspace`], matmuls run on [`QMatrix`] kernels and attention reads the cache
//! in place.

mod attention;
mod kv_cache;
mod lora_terms;
pub(crate) mod ops;

pub use kv_cache::KvCache;

use adapters::LoraModule;

use super::{Llama, LlamaConfig};
use crate::error::{Result, RuntimeError};
use crate::kernels::{Activations, QMatrix};
use crate::lora::{AdapterWeights, BaseWeight};
use lora_terms::{lora, lora_matmul, PREPARED_ROWS};
use ops::{rms_norm, rope, silu_mul};

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

/// One sequence's part of a step.
#[derive(Debug)]
pub struct SeqInput<'a> {
    /// The tokens to append: a prompt chunk, or the one token sampled last.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a AdapterWeights>,
    /// Whether to compute logits for the last of `tokens` (not needed mid-prompt).
    pub logits: bool,
    /// Logits for every one of `tokens`, not only the last (prompt log-probabilities);
    /// implies `logits`.
    pub all_logits: bool,
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

/// An output buffer that parallel tasks write disjoint rows (or heads) of.
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
    /// sequence that asks, the logits of its last token (of every token with `all_logits`)
    /// into `logits` (`vocab` floats each, in input order).
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
        let wanted: Vec<usize> = seqs
            .iter()
            .zip(&starts)
            .flat_map(|(s, &st)| {
                let end = st + s.tokens.len();
                let from = if s.all_logits {
                    st
                } else if s.logits {
                    end - 1
                } else {
                    end
                };
                from..end
            })
            .collect();
        let last = grow(&mut ws.last, wanted.len() * hs);
        for (i, &row) in wanted.iter().enumerate() {
            rms_norm(&ws.x[row * hs..(row + 1) * hs], &self.norm, eps, &mut last[i * hs..(i + 1) * hs]);
        }
        let vocab = cfg.vocab_size;
        logits.clear();
        logits.resize(wanted.len() * vocab, 0.0);
        self.lm_head.matmul(last, wanted.len(), logits, vocab);
    }
}
