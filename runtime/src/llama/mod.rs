//! A llama-architecture decoder in candle whose every linear layer is a [`LoraLinear`], so one
//! copy of the base weights serves many adapters at once and training runs the same code.
//!
//! Weights are kept in the HF layout (rotate-half RoPE); GGUF Q/K rows are un-permuted at load
//! so that PEFT adapters, trained on HF checkpoints, apply to them as they are.

mod chat;
mod load;
mod prefix;
pub(crate) mod runtime;

use adapters::{BaseModelShape, LoraModule};
use candle_core::{Device, IndexOp, Tensor, D};
use candle_nn::kv_cache::KvCache as CandleKvCache;

use crate::error::Result;
use crate::frozen::FrozenLinear;
use crate::kernels::QMatrix;
use crate::lora::{AdapterWeights, BaseWeight, LoraLinear, RowGroup};

pub use chat::{ChatModel, ChatTemplate, Role};
pub use load::{load_gguf_tokenizer, GgufMeta};
pub use prefix::{shared_prefix, PrefixCache};
pub use runtime::{KvCache, Runtime, SeqInput, Workspace};

/// Tokens of KV cache a sequence grows by at a time.
const CACHE_CHUNK: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub max_position: usize,
}

impl LlamaConfig {
    /// The shape adapters are validated against.
    pub fn shape(&self, name: &str) -> BaseModelShape {
        BaseModelShape {
            name: name.to_owned(),
            num_layers: self.num_layers,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// In `LoraModule::ALL` order.
    proj: Vec<LoraLinear>,
}

/// The model: embeddings, decoder blocks, final norm and LM head.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: BaseWeight,
    /// The LM head is the embedding matrix (GGUF files without `output.weight`).
    tied: bool,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Which ops the norms, RoPE, softmax and SwiGLU run on.
    ops: Ops,
}

/// The element-wise ops a [`Llama`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ops {
    /// candle's fused kernels (they record no gradient).
    Serving,
    /// candle's composed ops, which back-propagate: the reference the fused ones are checked
    /// against.
    Autograd,
    /// [`crate::train_ops`]: one parallel pass forward and one backward per op.
    Fused,
}

/// One sequence's KV cache, one entry per layer.
#[derive(Debug, Clone)]
pub struct SeqCache {
    layers: Vec<CandleKvCache>,
    len: usize,
}

impl SeqCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| CandleKvCache::new(2, CACHE_CHUNK)).collect(), len: 0 }
    }

    /// Tokens already in the cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A row of a cached forward pass: which adapter it uses.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub adapter: Option<&'a AdapterWeights>,
}

impl Llama {
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn rope_tables(cfg: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = cfg.head_dim / 2;
        let inv: Vec<f32> =
            (0..half).map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / cfg.head_dim as f32)).collect();
        let mut cos = Vec::with_capacity(cfg.max_position * half);
        let mut sin = Vec::with_capacity(cfg.max_position * half);
        for p in 0..cfg.max_position {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (cfg.max_position, half), device)?,
            Tensor::from_vec(sin, (cfg.max_position, half), device)?,
        ))
    }

    /// Groups consecutive rows that share an adapter, in units of `t` tokens per row.
    fn groups<'a>(rows: &[Row<'a>], layer: usize, module: LoraModule, t: usize) -> Vec<RowGroup<'a>> {
        let mut out: Vec<RowGroup<'a>> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let pair = row.adapter.and_then(|a| a.pair(layer, module));
            match out.last_mut() {
                Some(g) if same(g.pair, pair) => g.len += t,
                _ => out.push(RowGroup { start: i * t, len: t, pair }),
            }
        }
        out
    }

    /// Positions `start[b] + 0..t` for every row, as cos/sin of shape `[b, t, head_dim/2]`.
    fn rope_rows(&self, starts: &[usize], t: usize) -> Result<(Tensor, Tensor)> {
        let idx: Vec<u32> = starts.iter().flat_map(|&s| (s..s + t).map(|p| p as u32)).collect();
        let idx = Tensor::from_vec(idx, starts.len() * t, &self.device)?;
        let half = self.config.head_dim / 2;
        let cos = self.cos.index_select(&idx, 0)?.reshape((starts.len(), t, half))?;
        let sin = self.sin.index_select(&idx, 0)?.reshape((starts.len(), t, half))?;
        Ok((cos, sin))
    }

    /// Forward with per-row KV caches and adapters. `tokens` is `[b, t]`; every row continues
    /// its own cache. Returns logits `[b, vocab]` of each row's last token when `last_only`,
    /// else `[b, t, vocab]`.
    pub fn forward_cached(
        &self,
        tokens: &Tensor,
        rows: &[Row<'_>],
        caches: &mut [&mut SeqCache],
        last_only: bool,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let starts: Vec<usize> = caches.iter().map(|c| c.len).collect();
        let (cos, sin) = self.rope_rows(&starts, t)?;
        let mut x = self.embed.index_select(&tokens.flatten_all()?, 0)?.reshape((b, t, self.config.hidden_size))?;
        for (l, block) in self.blocks.iter().enumerate() {
            x = self.block(block, l, &x, rows, &cos, &sin, Some(caches))?;
        }
        for c in caches.iter_mut() {
            c.len += t;
        }
        self.head(&x, last_only)
    }

    /// Forward without caches from position 0 with one adapter for every row (training,
    /// evaluation, tests). Causal. Returns logits `[b, t, vocab]`.
    pub fn forward_full(&self, tokens: &Tensor, adapter: Option<&AdapterWeights>) -> Result<Tensor> {
        let x = self.forward_hidden(tokens, adapter)?;
        self.head(&x, false)
    }

    /// The last block's output `[b, t, hidden]` (before the final norm), from position 0 with
    /// one adapter for every row. Training takes the rows it scores and calls
    /// [`Llama::logits_rows`] on just those, so the LM head never runs on prompt positions.
    pub fn forward_hidden(&self, tokens: &Tensor, adapter: Option<&AdapterWeights>) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let rows = vec![Row { adapter }; b];
        let (cos, sin) = self.rope_rows(&vec![0; b], t)?;
        let mut x = self.embed.index_select(&tokens.flatten_all()?, 0)?.reshape((b, t, self.config.hidden_size))?;
        for (l, block) in self.blocks.iter().enumerate() {
            x = self.block(block, l, &x, &rows, &cos, &sin, None)?;
        }
        Ok(x)
    }

    /// Final norm and LM head for hidden rows `[n, hidden]` → logits `[n, vocab]`.
    pub fn logits_rows(&self, hidden: &Tensor) -> Result<Tensor> {
        let x = self.rms_norm(&hidden.contiguous()?, &self.norm)?;
        Ok(self.lm_head.forward(&x)?)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.config.rms_eps as f32;
        Ok(match self.ops {
            Ops::Serving => candle_nn::ops::rms_norm(x, w, eps)?,
            Ops::Autograd => candle_nn::ops::rms_norm_slow(x, w, eps)?,
            Ops::Fused => crate::train_ops::rms_norm(x, w, eps)?,
        })
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        match self.ops {
            Ops::Serving => return Ok(candle_nn::rotary_emb::rope(x, cos, sin)?),
            Ops::Fused => return Ok(crate::train_ops::rope(x, cos, sin)?),
            Ops::Autograd => {}
        }
        // x `[b, heads, t, hd]`, cos/sin `[b, t, hd/2]`: rotate-half RoPE from plain ops.
        let half = x.dim(D::Minus1)? / 2;
        let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
        let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
        let rotated =
            Tensor::cat(&[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
    }

    fn head(&self, x: &Tensor, last_only: bool) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let x = if last_only { x.narrow(1, t - 1, 1)? } else { x.clone() };
        let t_out = if last_only { 1 } else { t };
        let x = self.rms_norm(&x.contiguous()?, &self.norm)?;
        let logits = self.lm_head.forward(&x.reshape((b * t_out, h))?)?;
        Ok(if last_only { logits } else { logits.reshape((b, t, self.config.vocab_size))? })
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        block: &Block,
        layer: usize,
        x: &Tensor,
        rows: &[Row<'_>],
        cos: &Tensor,
        sin: &Tensor,
        caches: Option<&mut [&mut SeqCache]>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t, hsz) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let proj = |m: LoraModule, input: &Tensor| -> Result<Tensor> {
            let idx = LoraModule::ALL.iter().position(|x| *x == m).unwrap_or(0);
            Ok(block.proj[idx].forward_rows(input, &Self::groups(rows, layer, m, t))?)
        };
        let h = self.rms_norm(x, &block.attn_norm)?.reshape((b * t, hsz))?;
        let q = proj(LoraModule::QProj, &h)?.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = proj(LoraModule::KProj, &h)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = proj(LoraModule::VProj, &h)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = self.rope(&q, cos, sin)?;
        let k = self.rope(&k, cos, sin)?;
        let attn = match caches {
            Some(caches) => {
                let mut outs = Vec::with_capacity(b);
                for (i, cache) in caches.iter_mut().enumerate() {
                    let (k_all, v_all) = cache.layers[layer].append(&k.i(i..i + 1)?, &v.i(i..i + 1)?)?;
                    outs.push(self.attend(&q.i(i..i + 1)?, &k_all, &v_all, cache.len)?);
                }
                Tensor::cat(&outs, 0)?
            }
            None => self.attend(&q, &k, &v, 0)?,
        };
        let o = attn.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        let x = (x + proj(LoraModule::OProj, &o)?.reshape((b, t, hsz))?)?;
        let h = self.rms_norm(&x, &block.ffn_norm)?.reshape((b * t, hsz))?;
        let gate = proj(LoraModule::GateProj, &h)?;
        let up = proj(LoraModule::UpProj, &h)?;
        let act = match self.ops {
            Ops::Fused => crate::train_ops::swiglu(&gate, &up)?,
            _ => (candle_nn::ops::silu(&gate)? * up)?,
        };
        let down = proj(LoraModule::DownProj, &act)?.reshape((b, t, hsz))?;
        Ok((x + down)?)
    }

    /// Grouped-query attention of `q` `[b, nh, t, hd]` over `k`, `v` `[b, nkv, len, hd]`, where
    /// the queries sit at positions `offset..offset + t` and keys at `0..len`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, offset: usize) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, nh, t, hd) = q.dims4()?;
        let nkv = cfg.num_kv_heads;
        let rep = nh / nkv;
        let len = k.dim(2)?;
        if self.ops == Ops::Fused {
            let scores = q.reshape((b, nkv, rep * t, hd))?.matmul(&k.t()?)?;
            let probs = crate::train_ops::causal_softmax(&scores, 1.0 / (hd as f32).sqrt(), t, offset)?;
            return Ok(probs.matmul(&v.contiguous()?)?.reshape((b, nh, t, hd))?);
        }
        let q = (q.reshape((b, nkv, rep * t, hd))? * (1.0 / (hd as f64).sqrt()))?;
        let scores = q.matmul(&k.t()?)?;
        let scores = if t > 1 {
            let mut mask = vec![0f32; t * len];
            for qi in 0..t {
                for kj in (offset + qi + 1)..len {
                    mask[qi * len + kj] = f32::NEG_INFINITY;
                }
            }
            let mask = Tensor::from_vec(mask, (t, len), &self.device)?;
            scores.reshape((b, nkv, rep, t, len))?.broadcast_add(&mask)?.reshape((b, nkv, rep * t, len))?
        } else {
            scores
        };
        let probs = match self.ops {
            Ops::Autograd => candle_nn::ops::softmax(&scores, D::Minus1)?,
            _ => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        Ok(probs.matmul(&v.contiguous()?)?.reshape((b, nh, t, hd))?)
    }

    /// A copy of this model with `adapter` merged into dense base weights (`W + scale·BA`).
    pub fn merged(&self, adapter: &AdapterWeights) -> Result<Llama> {
        let mut out = self.clone();
        // The head too: candle's quantized matmul rounds its input to 8 bits, which on SmolLM2
        // (final activations up to ~4,000) moves logits by ~0.2.
        out.lm_head = BaseWeight::Dense(self.lm_head.to_dense()?);
        for (l, block) in out.blocks.iter_mut().enumerate() {
            for p in block.proj.iter_mut() {
                let dense = p.base.to_dense()?;
                let dense = match adapter.pair(l, p.module) {
                    Some(pair) => (dense + pair.merged_delta()?)?,
                    None => dense,
                };
                p.base = BaseWeight::Dense(dense);
            }
        }
        Ok(out)
    }

    /// Whether the LM head is the embedding matrix (no separate head in the checkpoint).
    pub fn tied(&self) -> bool {
        self.tied
    }

    /// Every weight under its HF checkpoint name, dense f32 in the HF (rotate-half) layout, in
    /// checkpoint order; the LM head only when it is not the embedding matrix. What an export
    /// writes, so that the exporter never reaches into the model's fields.
    pub(crate) fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        let mut out = vec![("model.embed_tokens.weight".to_owned(), f32(&self.embed)?)];
        for (l, block) in self.blocks.iter().enumerate() {
            out.push((format!("model.layers.{l}.input_layernorm.weight"), f32(&block.attn_norm)?));
            for p in &block.proj {
                let name = format!("model.layers.{l}.{}.{}.weight", p.module.parent(), p.module.name());
                out.push((name, f32(&p.base.to_dense()?)?));
            }
            out.push((format!("model.layers.{l}.post_attention_layernorm.weight"), f32(&block.ffn_norm)?));
        }
        out.push(("model.norm.weight".to_owned(), f32(&self.norm)?));
        if !self.tied {
            out.push(("lm_head.weight".to_owned(), f32(&self.lm_head.to_dense()?)?));
        }
        Ok(out)
    }

    /// Every base weight as dense f32 (the exactness tests' reference).
    pub fn to_dense(&self) -> Result<Llama> {
        self.merged(&AdapterWeights::empty(self.config.num_layers))
    }

    /// The same weights with norms, RoPE and softmax computed by ops that back-propagate
    /// (candle's fused kernels for them do not); dense weights then get candle's matmul
    /// gradients, the reference the frozen training path is checked against.
    pub fn with_autograd(&self) -> Llama {
        Llama { ops: Ops::Autograd, ..self.clone() }
    }

    /// The model for training LoRA on: every linear (and the head) becomes a
    /// [`crate::frozen::FrozenLinear`] that multiplies with the packed serving kernels (GGUF
    /// blocks stay as they are, so training sees exactly the weights that serving uses) and
    /// back-propagates only to its input, from the same packed weights; norms, RoPE, softmax
    /// and SwiGLU run on [`crate::train_ops`].
    pub fn for_training(&self) -> Result<Llama> {
        fn frozen(w: &BaseWeight) -> Result<BaseWeight> {
            let packed = match w {
                BaseWeight::Quantized(q) => match q.as_ref() {
                    candle_core::quantized::QMatMul::QTensor(t) => QMatrix::from_qtensor(t)?,
                    _ => dense_matrix(&w.to_dense()?)?,
                },
                BaseWeight::Frozen(f) => f.packed().clone(),
                BaseWeight::Dense(t) => dense_matrix(t)?,
            };
            Ok(BaseWeight::Frozen(FrozenLinear::new(packed)))
        }
        fn dense_matrix(t: &Tensor) -> Result<QMatrix> {
            let (rows, cols) = t.dims2()?;
            Ok(QMatrix::dense(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?, rows, cols))
        }
        let mut out = Llama { ops: Ops::Fused, ..self.clone() };
        out.lm_head = frozen(&self.lm_head)?;
        for block in out.blocks.iter_mut() {
            for p in block.proj.iter_mut() {
                p.base = frozen(&p.base)?;
            }
        }
        Ok(out)
    }
}

fn same(a: Option<&crate::lora::LoraPair>, b: Option<&crate::lora::LoraPair>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => std::ptr::eq(x, y),
        _ => false,
    }
}

/// Index of the largest of `logits` as the serving runtime returns them (greedy decoding);
/// the first on a tie.
pub fn argmax_of(logits: &[f32]) -> u32 {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0 as u32
}

/// Index of the largest logit (greedy decoding).
pub fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.flatten_all()?.argmax(D::Minus1)?.to_scalar::<u32>()?)
}
