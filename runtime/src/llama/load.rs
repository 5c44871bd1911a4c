//! Loading llama weights: GGUF files (quantized, Q/K rows un-permuted to the HF layout) and HF
//! directories (safetensors, dense f32), plus the GGUF-embedded tokenizer and chat template.

use std::borrow::Cow;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use adapters::LoraModule;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::Tokenizer;

use super::{Block, Llama, LlamaConfig};
use crate::error::{Result, RuntimeError};
use crate::lora::{BaseWeight, LoraLinear};

/// What the GGUF file says about serving besides the weights.
#[derive(Debug, Clone)]
pub struct GgufMeta {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token_ids: Vec<u32>,
    pub name: Option<String>,
}

fn meta_u32(ct: &Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| v.to_u32().ok().or_else(|| v.to_u64().ok().map(|x| x as u32)))
}

fn meta_f64(ct: &Content, key: &str) -> Option<f64> {
    ct.metadata.get(key).and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
}

fn meta_str(ct: &Content, key: &str) -> Option<String> {
    ct.metadata.get(key).and_then(|v| v.to_string().ok().cloned())
}

/// Reorders the rows of a quantized `[out, in]` weight from llama.cpp's interleaved RoPE
/// layout back to the HF rotate-half layout, head by head.
fn unpermute_rows(qt: QTensor, heads: usize) -> candle_core::Result<QTensor> {
    let (out, inp) = qt.shape().dims2()?;
    let dtype = qt.dtype();
    let row_bytes = inp / dtype.block_size() * dtype.type_size();
    let data = qt.data()?;
    let hd = out / heads;
    let mut reordered = vec![0u8; data.len()];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..hd / 2 {
                let hf = h * hd + s * (hd / 2) + i;
                let gguf = h * hd + 2 * i + s;
                reordered[hf * row_bytes..(hf + 1) * row_bytes]
                    .copy_from_slice(&data[gguf * row_bytes..(gguf + 1) * row_bytes]);
            }
        }
    }
    // Borrowed on purpose: candle 0.10.2's `from_data` reinterprets the bytes through a slice
    // that outlives an owned Cow, so an owned buffer would be read after it is freed.
    let storage = QStorage::from_data(Cow::Borrowed(reordered.as_slice()), &Device::Cpu, dtype)?;
    QTensor::new(storage, (out, inp))
}

impl Llama {
    /// Loads a llama-architecture GGUF file; returns the model and its serving metadata.
    pub fn from_gguf(path: &Path) -> Result<(Llama, GgufMeta, Tokenizer)> {
        let device = Device::Cpu;
        let fail = |reason: String| RuntimeError::model(path, reason);
        let mut file = File::open(path).map_err(|e| RuntimeError::io(path, e))?;
        let ct = Content::read(&mut file).map_err(|e| fail(format!("not a readable GGUF file: {e}")))?;
        let arch = meta_str(&ct, "general.architecture").unwrap_or_default();
        if arch != "llama" {
            return Err(fail(format!("architecture is {arch:?}; only llama models are served by the candle engine")));
        }
        let get = |k: &str| {
            meta_u32(&ct, &format!("llama.{k}")).ok_or_else(|| fail(format!("GGUF metadata has no llama.{k}")))
        };
        let hidden = get("embedding_length")? as usize;
        let heads = get("attention.head_count")? as usize;
        let mut tensor = |name: &str| {
            ct.tensor(&mut file, name, &device).map_err(|e| RuntimeError::model(path, format!("tensor {name}: {e}")))
        };
        let embed_q = tensor("token_embd.weight")?;
        let vocab = embed_q.shape().dims2()?.0;
        let config = LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: get("feed_forward_length")? as usize,
            num_layers: get("block_count")? as usize,
            num_heads: heads,
            num_kv_heads: meta_u32(&ct, "llama.attention.head_count_kv").map_or(heads, |v| v as usize),
            head_dim: hidden / heads,
            rms_eps: meta_f64(&ct, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: meta_f64(&ct, "llama.rope.freq_base").unwrap_or(10_000.0),
            max_position: meta_u32(&ct, "llama.context_length").map_or(4096, |v| v as usize),
        };
        let embed = embed_q.dequantize(&device)?;
        let (lm_head, tied) = match tensor("output.weight") {
            Ok(q) => (q, false),
            // Tied embeddings: the LM head is the (still quantized) embedding matrix.
            Err(_) => (tensor("token_embd.weight")?, true),
        };
        let norm = tensor("output_norm.weight")?.dequantize(&device)?;
        let mut blocks = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let mut proj = Vec::with_capacity(7);
            for m in LoraModule::ALL {
                let suffix = match m {
                    LoraModule::QProj => "attn_q",
                    LoraModule::KProj => "attn_k",
                    LoraModule::VProj => "attn_v",
                    LoraModule::OProj => "attn_output",
                    LoraModule::GateProj => "ffn_gate",
                    LoraModule::UpProj => "ffn_up",
                    LoraModule::DownProj => "ffn_down",
                };
                let mut qt = tensor(&format!("blk.{l}.{suffix}.weight"))?;
                qt = match m {
                    LoraModule::QProj => unpermute_rows(qt, config.num_heads)?,
                    LoraModule::KProj => unpermute_rows(qt, config.num_kv_heads)?,
                    _ => qt,
                };
                proj.push(LoraLinear::new(m, BaseWeight::Quantized(Arc::new(QMatMul::from_qtensor(qt)?))));
            }
            blocks.push(Block {
                attn_norm: tensor(&format!("blk.{l}.attn_norm.weight"))?.dequantize(&device)?,
                ffn_norm: tensor(&format!("blk.{l}.ffn_norm.weight"))?.dequantize(&device)?,
                proj,
            });
        }
        let tokenizer = load_gguf_tokenizer(&ct).map_err(|e| fail(format!("tokenizer: {e}")))?;
        let mut eos_token_ids: Vec<u32> = meta_u32(&ct, "tokenizer.ggml.eos_token_id").into_iter().collect();
        for marker in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"] {
            if let Some(id) = tokenizer.token_to_id(marker) {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let bos_token = meta_u32(&ct, "tokenizer.ggml.bos_token_id").and_then(|id| tokenizer.id_to_token(id));
        let meta = GgufMeta {
            chat_template: meta_str(&ct, "tokenizer.chat_template"),
            bos_token,
            eos_token_ids,
            name: meta_str(&ct, "general.name"),
        };
        let (cos, sin) = Llama::rope_tables(&config, &device)?;
        let lm_head = BaseWeight::Quantized(Arc::new(QMatMul::from_qtensor(lm_head)?));
        let model = Llama { config, embed, blocks, norm, lm_head, tied, cos, sin, device, ops: super::Ops::Serving };
        Ok((model, meta, tokenizer))
    }

    /// Loads an HF llama directory (`config.json` + `*.safetensors`) as dense f32 weights.
    pub fn from_hf_dir(dir: &Path) -> Result<Llama> {
        let device = Device::Cpu;
        let fail = |reason: String| RuntimeError::model(dir, reason);
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| RuntimeError::io(&cfg_path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| fail(format!("config.json: {e}")))?;
        let num = |k: &str| raw.get(k).and_then(serde_json::Value::as_u64).map(|v| v as usize);
        let need = |k: &str| num(k).ok_or_else(|| fail(format!("config.json has no {k}")));
        let hidden = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        let config = LlamaConfig {
            vocab_size: need("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: need("intermediate_size")?,
            num_layers: need("num_hidden_layers")?,
            num_heads: heads,
            num_kv_heads: num("num_key_value_heads").unwrap_or(heads),
            head_dim: num("head_dim").unwrap_or(hidden / heads),
            rms_eps: raw.get("rms_norm_eps").and_then(serde_json::Value::as_f64).unwrap_or(1e-5),
            rope_theta: raw.get("rope_theta").and_then(serde_json::Value::as_f64).unwrap_or(10_000.0),
            max_position: num("max_position_embeddings").unwrap_or(2048),
        };
        let tied = raw.get("tie_word_embeddings").and_then(serde_json::Value::as_bool).unwrap_or(false);
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| RuntimeError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(fail("no *.safetensors files".into()));
        }
        // SAFETY: the files are only read; nothing else maps them mutably while we hold them.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &device)? };
        let get = |name: &str, shape: (usize, usize)| -> Result<Tensor> {
            vb.get(shape, name).map_err(|e| RuntimeError::model(dir, format!("tensor {name}: {e}")))
        };
        let get1 = |name: &str, n: usize| -> Result<Tensor> {
            vb.get(n, name).map_err(|e| RuntimeError::model(dir, format!("tensor {name}: {e}")))
        };
        let embed = get("model.embed_tokens.weight", (config.vocab_size, hidden))?;
        let mut blocks = Vec::with_capacity(config.num_layers);
        let shape = config.shape("hf");
        for l in 0..config.num_layers {
            let mut proj = Vec::with_capacity(7);
            for m in LoraModule::ALL {
                let (inp, out) = shape.dims(m);
                let w = get(&format!("model.layers.{l}.{}.{}.weight", m.parent(), m.name()), (out, inp))?;
                proj.push(LoraLinear::new(m, BaseWeight::Dense(w)));
            }
            blocks.push(Block {
                attn_norm: get1(&format!("model.layers.{l}.input_layernorm.weight"), hidden)?,
                ffn_norm: get1(&format!("model.layers.{l}.post_attention_layernorm.weight"), hidden)?,
                proj,
            });
        }
        let norm = get1("model.norm.weight", hidden)?;
        let head = if tied { embed.clone() } else { get("lm_head.weight", (config.vocab_size, hidden))? };
        let (cos, sin) = Llama::rope_tables(&config, &device)?;
        let lm_head = BaseWeight::Dense(head);
        Ok(Llama { config, embed, blocks, norm, lm_head, tied, cos, sin, device, ops: super::Ops::Serving })
    }
}

/// Builds the tokenizer a GGUF file embeds, matching the HF tokenizer of its pre-tokenizer kind.
pub fn load_gguf_tokenizer(ct: &Content) -> candle_core::Result<Tokenizer> {
    use candle_core::quantized::tokenizer::TokenizerFromGguf;
    use tokenizers::pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence};
    let mut tokenizer = Tokenizer::from_gguf(ct)?;
    let pre = ct.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok().cloned());
    if pre.as_deref() == Some("smollm") {
        // SmolLM's tokenizer.json: digits one by one, then GPT-2 byte-level without a prefix space.
        let seq = Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]);
        tokenizer.with_pre_tokenizer(Some(seq));
    }
    Ok(tokenizer)
}
