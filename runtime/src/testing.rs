//! Tiny deterministic llama models and adapters that tests (here, in the gateway and in
//! finetune) write to disk themselves, so fast tests need no downloaded weights.

use std::collections::HashMap;
use std::path::Path;

use adapters::{write_adapter_dir, AdapterConfig, BaseModelShape, LoraModule, LoraPart, LoraTensorKey, TargetModules};
use candle_core::{Device, Tensor};

use crate::error::{Result, RuntimeError};

/// Twenty everyday chat prompts: the export checks (the test and `switchyard-export-check`)
/// decode them greedily on the original and the exported model.
pub const CHAT_PROMPTS: [&str; 20] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three primary colours.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for learning to cook.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat to someone who has never seen one.",
    "What does a lighthouse keeper do?",
    "Suggest a name for a small bakery.",
    "Why is the sky blue?",
    "Write the first line of a mystery novel.",
    "What is the boiling point of water at sea level?",
    "Name a planet with rings.",
    "How do I say thank you in Japanese?",
    "What should I pack for a day at the beach?",
    "Summarise the plot of Cinderella in two sentences.",
    "What is a prime number?",
];

/// The shape of the model [`write_tiny_llama`] writes.
pub fn tiny_llama_shape() -> BaseModelShape {
    BaseModelShape {
        name: "tiny-llama".to_owned(),
        num_layers: 2,
        hidden_size: 32,
        intermediate_size: 64,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
    }
}

/// Words of the tiny model's vocabulary after the three special tokens.
const WORDS: &str = "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 the cat dog sat on mat red blue green yes no is it what capital of france paris hello world . , ? !";

/// Deterministic values in [-scale, scale) from a seed (an LCG; no RNG state is shared).
pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32 - 1.0) * scale
        })
        .collect()
}

/// Writes an HF-layout llama (`config.json`, `model.safetensors`, `tokenizer.json`,
/// `tokenizer_config.json`) with random weights from `seed` into `dir`.
pub fn write_tiny_llama(dir: &Path, seed: u64) -> Result<BaseModelShape> {
    write_tiny_llama_with_head(dir, seed, 0.3)
}

/// [`write_tiny_llama`] with the LM head's weights drawn from `±head_scale`. Training tests use
/// a larger head: behind the final RMSNorm, the head's scale bounds how far apart logits can
/// get, and at 0.3 a tiny model cannot make any token much more likely than the rest.
pub fn write_tiny_llama_with_head(dir: &Path, seed: u64, head_scale: f32) -> Result<BaseModelShape> {
    let shape = tiny_llama_shape();
    std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io(dir, e))?;
    let mut vocab: Vec<String> = vec!["<unk>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    vocab.extend(WORDS.split(' ').map(str::to_owned));
    let vocab_size = vocab.len();
    let h = shape.hidden_size;
    let dev = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut next_seed = seed;
    let mut add = |name: String, dims: (usize, usize), scale: f32| -> Result<()> {
        next_seed += 1;
        let t = Tensor::from_vec(values(dims.0 * dims.1, next_seed, scale), dims, &dev)?;
        tensors.insert(name, t);
        Ok(())
    };
    add("model.embed_tokens.weight".into(), (vocab_size, h), 1.0)?;
    add("lm_head.weight".into(), (vocab_size, h), head_scale)?;
    for l in 0..shape.num_layers {
        for m in LoraModule::ALL {
            let (inp, out) = shape.dims(m);
            add(format!("model.layers.{l}.{}.{}.weight", m.parent(), m.name()), (out, inp), 0.3)?;
        }
    }
    for l in 0..shape.num_layers {
        tensors.insert(
            format!("model.layers.{l}.input_layernorm.weight"),
            Tensor::ones(h, candle_core::DType::F32, &dev)?,
        );
        tensors.insert(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            Tensor::ones(h, candle_core::DType::F32, &dev)?,
        );
    }
    tensors.insert("model.norm.weight".into(), Tensor::ones(h, candle_core::DType::F32, &dev)?);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": h,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    });
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let vocab_map: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, w)| (w.clone(), serde_json::json!(i))).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(1, "<|im_start|>"), special(2, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab_map, "unk_token": "<unk>"},
    });
    let tokenizer_config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}",
    });
    for (name, value) in
        [("config.json", config), ("tokenizer.json", tokenizer), ("tokenizer_config.json", tokenizer_config)]
    {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(&value).unwrap_or_default())
            .map_err(|e| RuntimeError::io(&path, e))?;
    }
    Ok(shape)
}

/// Writes a PEFT adapter for `shape` on every module and layer with random non-zero A and B
/// (or B all zeros when `zero_b`, which makes it a no-op).
pub fn write_random_adapter(
    dir: &Path,
    shape: &BaseModelShape,
    r: usize,
    seed: u64,
    zero_b: bool,
) -> Result<AdapterConfig> {
    write_adapter_with(dir, shape, r, seed, |_, part, _| if zero_b && part == LoraPart::B { 0.0 } else { 0.8 })
}

/// Writes an adapter on every module and layer whose magnitudes are those of a trained one:
/// A within PEFT's initialisation bound `1/√in`, B within ±0.02 (so `scale·BA` changes the
/// weights by a few percent rather than swamping them). Benchmarks use it: an adapter that
/// blows activations up sends them down slow overflow paths no served adapter takes.
pub fn write_bench_adapter(dir: &Path, shape: &BaseModelShape, r: usize, seed: u64) -> Result<AdapterConfig> {
    write_adapter_with(dir, shape, r, seed, |_, part, dims| match part {
        LoraPart::A => 1.0 / (dims[1] as f32).sqrt(),
        LoraPart::B => 0.02,
    })
}

/// An adapter on every module and layer with uniform values of amplitude
/// `amplitude(key, part, dims)`.
fn write_adapter_with(
    dir: &Path,
    shape: &BaseModelShape,
    r: usize,
    seed: u64,
    amplitude: impl Fn(&LoraTensorKey, LoraPart, &[usize]) -> f32,
) -> Result<AdapterConfig> {
    let mut config = AdapterConfig::new(r, 2.0 * r as f64, TargetModules::AllLinear);
    config.base_model_name_or_path = Some(shape.name.clone());
    let mut tensors = Vec::new();
    let mut s = seed;
    for layer in 0..shape.num_layers {
        for module in LoraModule::ALL {
            for part in [LoraPart::A, LoraPart::B] {
                let key = LoraTensorKey { layer, module, part };
                let dims = shape.expected_shape(&key, r);
                s += 1;
                let n = dims[0] * dims[1];
                let amp = amplitude(&key, part, &dims);
                let data = if amp == 0.0 { vec![0.0; n] } else { values(n, s, amp) };
                tensors.push((key, data, dims.to_vec()));
            }
        }
    }
    write_adapter_dir(dir, &config, &tensors)?;
    Ok(config)
}
