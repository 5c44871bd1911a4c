//! BERT encoders (all-MiniLM-L6-v2 and kin) in candle, with the checkpoint's own tensor names.
//!
//! [`Bert`] is the encoder stack alone (embeddings, then self-attention layers) over a padded
//! batch with an attention mask; [`SentenceEncoder`] (in `encoder.rs`) adds the tokenizer and
//! sentence-transformers' pooling, and is what serving calls.

mod encoder;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, Module, VarBuilder};
use serde::Deserialize;

pub use encoder::{SentenceEncoder, Tokens, FORWARD_TOKEN_BUDGET};

use crate::Result;

/// The fields of an HF BERT `config.json` that the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".to_owned()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position_type() -> String {
    "absolute".to_owned()
}

impl BertConfig {
    /// Refuses what this encoder does not implement, rather than computing something else.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.hidden_act != "gelu" {
            return Err(format!("hidden_act {:?} is not served (only \"gelu\", the erf form)", self.hidden_act));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!("position_embedding_type {:?} is not served", self.position_embedding_type));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}

/// Word, position and token-type embeddings, summed and normalised.
struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

impl Embeddings {
    fn new(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word: embedding(cfg.vocab_size, h, vb.pp("word_embeddings"))?,
            position: embedding(cfg.max_position_embeddings, h, vb.pp("position_embeddings"))?,
            token_type: embedding(cfg.type_vocab_size, h, vb.pp("token_type_embeddings"))?,
            norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// `ids` is `[batch, len]`; every token is of type 0 (single sentences).
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let len = ids.dim(1)?;
        let positions = Tensor::arange(0u32, len as u32, ids.device())?;
        let words = self.word.forward(ids)?;
        let positions = self.position.forward(&positions)?;
        let token_type = self.token_type.embeddings().get(0)?;
        let sum = words.broadcast_add(&positions)?.broadcast_add(&token_type)?;
        self.norm.forward(&sum)
    }
}

/// Multi-head self-attention (`attention.self.*`). The query, key and value projections are
/// loaded under their own names and run as one matmul (their weights stacked at load), which
/// reads the activations once and gives the matmul three times the columns.
struct SelfAttention {
    qkv: Linear,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let parts = ["query", "key", "value"].map(|name| linear(h, h, vb.pp(name)));
        let [q, k, v] = parts;
        let (q, k, v) = (q?, k?, v?);
        let weight = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
        let bias = match (q.bias(), k.bias(), v.bias()) {
            (Some(qb), Some(kb), Some(vb)) => Some(Tensor::cat(&[qb, kb, vb], 0)?),
            _ => None,
        };
        Ok(Self {
            qkv: Linear::new(weight, bias),
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// `x` is `[batch, len, hidden]`, `mask_bias` `[batch, 1, 1, len]` (0 or a huge negative).
    fn forward(&self, x: &Tensor, mask_bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let qkv = self.qkv.forward(x)?.reshape((b, t, 3, self.heads, self.head_dim))?;
        // Each of q, k, v as `[batch, heads, len, head_dim]`, laid out for the batched matmuls.
        let split = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(mask_bias)?)?;
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))
    }
}

/// One encoder layer (`encoder.layer.N.*`): attention, then the feed-forward block, each with
/// a residual and a post-norm.
struct Layer {
    attention: SelfAttention,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl Layer {
    fn new(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Self {
            attention: SelfAttention::new(cfg, vb.pp("attention.self"))?,
            attention_out: linear(h, h, vb.pp("attention.output.dense"))?,
            attention_norm: layer_norm(h, eps, vb.pp("attention.output.LayerNorm"))?,
            intermediate: linear(h, i, vb.pp("intermediate.dense"))?,
            output: linear(i, h, vb.pp("output.dense"))?,
            output_norm: layer_norm(h, eps, vb.pp("output.LayerNorm"))?,
        })
    }

    fn forward(&self, x: &Tensor, mask_bias: &Tensor) -> candle_core::Result<Tensor> {
        let attended = self.attention_out.forward(&self.attention.forward(x, mask_bias)?)?;
        let x = self.attention_norm.forward(&(attended + x)?)?;
        let inner = gelu(&self.intermediate.forward(&x)?)?;
        self.output_norm.forward(&(self.output.forward(&inner)? + x)?)
    }
}

/// The BERT encoder stack. The pooler head is not loaded: sentence embeddings pool the last
/// hidden states.
pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pub config: BertConfig,
}

impl Bert {
    /// `vb` at the checkpoint's root (`embeddings.*`, `encoder.layer.N.*`).
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        cfg.check().map_err(candle_core::Error::msg)?;
        let embeddings = Embeddings::new(cfg, vb.pp("embeddings"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| Layer::new(cfg, vb.pp(format!("encoder.layer.{l}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { embeddings, layers, config: cfg.clone() })
    }

    /// Last hidden states `[batch, len, hidden]` of a padded batch: `ids` and `mask` are
    /// `[batch, len]`, the mask 1 for real tokens and 0 for padding (u32 ids, f32 mask).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        // Padding gets the most negative f32 added to its scores, as transformers does, so its
        // softmax weight is exactly 0 and real tokens' states do not depend on the padding.
        let mask_bias = ((mask.ones_like()? - mask)? * f64::from(f32::MIN))?.reshape((b, 1, 1, t))?;
        let mut x = self.embeddings.forward(ids)?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask_bias)?;
        }
        Ok(x)
    }
}

/// Mean of the hidden states over the mask's real tokens, `[batch, hidden]`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?;
    let summed = hidden.broadcast_mul(&mask.unsqueeze(D::Minus1)?)?.sum(1)?;
    let counts = mask.sum_keepdim(1)?.clamp(1e-9f32, f32::MAX)?;
    Ok(summed.broadcast_div(&counts)?)
}

/// Each row divided by its L2 norm (at least 1e-12), as `torch.nn.functional.normalize` does.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// GELU in its exact (erf) form, as BERT's `hidden_act: "gelu"` is, over every core. candle's
/// `gelu_erf` calls libm's `erff` per element on one thread, and took a fifth of a forward;
/// this erf is Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7, under f32's own
/// rounding of the activations that follow) on the runtime's vectorizable `exp`.
fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let mut values = x.flatten_all()?.to_vec1::<f32>()?;
    values.par_chunks_mut(4096).for_each(|chunk| chunk.iter_mut().for_each(|v| *v = gelu_erf(*v)));
    Tensor::from_vec(values, x.shape(), x.device())
}

#[inline]
fn gelu_erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152, 1.061_405_4];
    let s = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = s.abs();
    let t = 1.0 / P.mul_add(a, 1.0);
    let poly = t * A[4].mul_add(t, A[3]).mul_add(t, A[2]).mul_add(t, A[1]).mul_add(t, A[0]);
    let erf = (1.0 - poly * crate::llama::runtime::ops::exp_nonpositive(-a * a)).copysign(s);
    0.5 * x * (1.0 + erf)
}

/// The device every encoder runs on.
pub(crate) fn device() -> Device {
    Device::Cpu
}

#[cfg(test)]
mod tests {
    /// Against libm's erf in f64 over the range BERT's activations take.
    #[test]
    fn fast_gelu_matches_the_erf_form() {
        let mut worst = 0f64;
        for i in 0..=400_000 {
            let x = -20.0 + 40.0 * f64::from(i) / 400_000.0;
            let want = 0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2));
            let got = f64::from(super::gelu_erf(x as f32));
            worst = worst.max((got - want).abs() / x.abs().max(1.0));
        }
        assert!(worst < 3e-7, "worst error {worst}");
    }

    /// erf to f64 precision (the series for small arguments, the continued fraction beyond).
    fn erf64(x: f64) -> f64 {
        let a = x.abs();
        let r = if a < 3.0 {
            let (mut term, mut sum, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = f64::from(k) / 2.0 / (a + f);
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
        };
        r.copysign(x)
    }
}
