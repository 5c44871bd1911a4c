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

/// Multi-head self-attention (`attention.self.*`).
struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            query: linear(h, h, vb.pp("query"))?,
            key: linear(h, h, vb.pp("key"))?,
            value: linear(h, h, vb.pp("value"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// `x` is `[batch, len, hidden]`, `mask_bias` `[batch, 1, 1, len]` (0 or a huge negative).
    fn forward(&self, x: &Tensor, mask_bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let split = |y: Tensor| y.reshape((b, t, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous();
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
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
        let inner = self.intermediate.forward(&x)?.gelu_erf()?;
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

/// The device every encoder runs on.
pub(crate) fn device() -> Device {
    Device::Cpu
}
