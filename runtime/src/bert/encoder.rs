//! `SentenceEncoder`: a sentence-transformers BERT directory (tokenizer, mean pooling, L2
//! normalisation) run over batches of texts, one padded forward per chunk of the batch.

use std::cmp::Reverse;
use std::path::Path;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;
use tokenizers::Tokenizer;

use super::{device, l2_normalize, mean_pool, Bert, BertConfig};
use crate::{Result, RuntimeError};

/// Padded tokens (rows × the longest row) one forward may hold. A batch past it runs as
/// several forwards over length-sorted chunks, so attention scores stay within about 100 MiB
/// (rows × heads × len² floats) however many texts a batch merges.
pub const FORWARD_TOKEN_BUDGET: usize = 8192;

/// One input as the model runs it: `[CLS] … [SEP]`, cut to the encoder's `max_tokens`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// Whether content was cut off to fit `max_tokens`.
    pub truncated: bool,
}

/// A BERT sentence encoder loaded from a sentence-transformers directory: `config.json`,
/// `model.safetensors`, `tokenizer.json`, and optionally `1_Pooling/config.json`,
/// `modules.json` (whether a `Normalize` module follows) and `sentence_bert_config.json`
/// (`max_seq_length`, the truncation length sentence-transformers uses).
pub struct SentenceEncoder {
    bert: Bert,
    tokenizer: Tokenizer,
    max_tokens: usize,
    normalize: bool,
    cls: u32,
    sep: u32,
}

impl SentenceEncoder {
    /// Loads the directory; every missing file or unsupported setting is a
    /// [`RuntimeError::Model`] naming the directory and what is wrong.
    pub fn load(dir: &Path) -> Result<Self> {
        let fail = |reason: String| RuntimeError::model(dir, reason);
        let config: BertConfig = serde_json::from_value(
            read_json(dir, "config.json")?.ok_or_else(|| fail("config.json is missing".into()))?,
        )
        .map_err(|e| fail(format!("config.json: {e}")))?;
        config.check().map_err(|e| fail(format!("config.json: {e}")))?;
        if let Some(pooling) = read_json(dir, "1_Pooling/config.json")? {
            let on = |k: &str| pooling.get(k).and_then(Value::as_bool).unwrap_or(false);
            let others = ["pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens"];
            if !on("pooling_mode_mean_tokens") || others.iter().any(|k| on(k)) {
                return Err(fail("1_Pooling/config.json: only mean pooling is served".into()));
            }
        }
        // Without a modules.json the directory is a plain BERT; sentence embeddings of this
        // kind are normalised, so that is the default.
        let normalize = match read_json(dir, "modules.json")? {
            Some(Value::Array(modules)) => {
                modules.iter().any(|m| m.get("type").and_then(Value::as_str).is_some_and(|t| t.ends_with("Normalize")))
            }
            _ => true,
        };
        let max_tokens = read_json(dir, "sentence_bert_config.json")?
            .and_then(|c| c.get("max_seq_length").and_then(Value::as_u64))
            .map_or(config.max_position_embeddings, |n| n as usize)
            .min(config.max_position_embeddings);
        if max_tokens < 3 {
            return Err(fail(format!("max_seq_length {max_tokens} leaves no room for text")));
        }
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        // The file's own truncation (128) and fixed padding are for training; truncation is ours.
        tokenizer.with_truncation(None).map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        tokenizer.with_padding(None);
        let special = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| fail(format!("tokenizer.json has no {t}")));
        let (cls, sep) = (special("[CLS]")?, special("[SEP]")?);
        let weights_path = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights_path).map_err(|e| RuntimeError::io(&weights_path, e))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &device())?;
        let bert = Bert::new(&config, vb).map_err(|e| fail(format!("model.safetensors: {e}")))?;
        Ok(Self { bert, tokenizer, max_tokens, normalize, cls, sep })
    }

    /// Width of every embedding.
    pub fn dimension(&self) -> usize {
        self.bert.config.hidden_size
    }

    /// Most tokens one input runs with, `[CLS]` and `[SEP]` included; longer inputs are cut.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Token ids are below this.
    pub fn vocab_size(&self) -> usize {
        self.bert.config.vocab_size
    }

    /// Tokenizes a text as sentence-transformers does: `[CLS]`, the word pieces cut to fit
    /// `max_tokens`, `[SEP]`.
    pub fn tokenize(&self, text: &str) -> Result<Tokens> {
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| RuntimeError::invalid_step(format!("the tokenizer failed: {e}")))?;
        Ok(self.wrap(encoding.get_ids()))
    }

    /// Word-piece ids given by a client (no special tokens), wrapped and cut like a text's.
    /// Ids must be below [`Self::vocab_size`]; [`Self::embed`] refuses others.
    pub fn wrap(&self, pieces: &[u32]) -> Tokens {
        let room = self.max_tokens - 2;
        let kept = &pieces[..pieces.len().min(room)];
        let mut ids = Vec::with_capacity(kept.len() + 2);
        ids.push(self.cls);
        ids.extend_from_slice(kept);
        ids.push(self.sep);
        Tokens { ids, truncated: pieces.len() > room }
    }

    /// One embedding per input, in order. Inputs are sorted by length and run in chunks of at
    /// most [`FORWARD_TOKEN_BUDGET`] padded tokens: each chunk is one forward, one matmul per
    /// layer over all its rows.
    pub fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        for (i, ids) in inputs.iter().enumerate() {
            if ids.is_empty() || ids.len() > self.max_tokens {
                return Err(RuntimeError::invalid_step(format!(
                    "input {i} has {} tokens; an input has 1 to {}",
                    ids.len(),
                    self.max_tokens
                )));
            }
            if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab_size()) {
                return Err(RuntimeError::invalid_step(format!(
                    "input {i} has token id {id}, outside the vocabulary of {}",
                    self.vocab_size()
                )));
            }
        }
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| Reverse(inputs[i].len()));
        let mut out = vec![Vec::new(); inputs.len()];
        let mut start = 0;
        while start < order.len() {
            let longest = inputs[order[start]].len();
            let rows = (FORWARD_TOKEN_BUDGET / longest).max(1);
            let chunk = &order[start..(start + rows).min(order.len())];
            let rows: Vec<&[u32]> = chunk.iter().map(|&i| inputs[i].as_slice()).collect();
            for (&i, vector) in chunk.iter().zip(self.forward(&rows)?) {
                out[i] = vector;
            }
            start += chunk.len();
        }
        Ok(out)
    }

    /// One padded forward over `rows` (the first is the longest), pooled and normalised.
    fn forward(&self, rows: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let (b, t) = (rows.len(), rows.iter().map(|r| r.len()).max().unwrap_or(0));
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        for (r, row) in rows.iter().enumerate() {
            ids[r * t..r * t + row.len()].copy_from_slice(row);
            mask[r * t..r * t + row.len()].fill(1.0);
        }
        let ids = Tensor::from_vec(ids, (b, t), &device())?;
        let mask = Tensor::from_vec(mask, (b, t), &device())?;
        let hidden = self.bert.forward(&ids, &mask)?;
        let mut pooled = mean_pool(&hidden, &mask)?;
        if self.normalize {
            pooled = l2_normalize(&pooled)?;
        }
        Ok(pooled.to_vec2::<f32>()?)
    }
}

/// A JSON file of the model directory, or `None` when it does not exist.
fn read_json(dir: &Path, name: &str) -> Result<Option<Value>> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| RuntimeError::model(dir, format!("{name}: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RuntimeError::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real all-MiniLM-L6-v2 (`scripts/test.sh` exports its path; `scripts/fetch-models.sh`
    /// fetches it).
    fn encoder() -> SentenceEncoder {
        let dir = std::env::var_os("SWITCHYARD_TEST_EMBED_MODEL")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2"));
        assert!(dir.join("model.safetensors").is_file(), "{} is missing: run scripts/fetch-models.sh", dir.display());
        SentenceEncoder::load(&dir).unwrap()
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn padding_and_batch_neighbours_do_not_change_an_embedding() {
        let enc = encoder();
        let short = enc.tokenize("A cat sat on the mat.").unwrap().ids;
        let long = enc.tokenize(&"The quick brown fox jumps over the lazy dog. ".repeat(8)).unwrap().ids;
        let alone = enc.embed(std::slice::from_ref(&short)).unwrap();
        let together = enc.embed(&[long.clone(), short.clone(), long]).unwrap();
        assert_eq!(together.len(), 3);
        assert_eq!(together[0], together[2]);
        let distance = 1.0 - cosine(&alone[0], &together[1]);
        assert!(distance < 1e-6, "padding moved the embedding by {distance}");
        let norm: f32 = alone[0].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        assert_eq!(alone[0].len(), enc.dimension());
    }

    #[test]
    fn long_texts_are_cut_to_max_tokens_like_sentence_transformers() {
        let enc = encoder();
        assert_eq!(enc.max_tokens(), 256, "all-MiniLM-L6-v2's sentence_bert_config.json says 256");
        let t = enc.tokenize(&"word ".repeat(600)).unwrap();
        assert!(t.truncated);
        assert_eq!(t.ids.len(), 256);
        assert_eq!((t.ids[0], t.ids[255]), (enc.cls, enc.sep));
        let short = enc.tokenize("hello world").unwrap();
        assert!(!short.truncated);
        assert_eq!(short.ids.len(), 4);
    }

    #[test]
    fn similar_sentences_are_closer_than_unrelated_ones() {
        let enc = encoder();
        let texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."];
        let ids: Vec<_> = texts.iter().map(|t| enc.tokenize(t).unwrap().ids).collect();
        let v = enc.embed(&ids).unwrap();
        assert!(cosine(&v[0], &v[1]) > cosine(&v[0], &v[2]) + 0.3);
    }

    #[test]
    fn a_batch_past_the_token_budget_runs_in_chunks_with_the_same_answers() {
        let enc = encoder();
        let long = enc.tokenize(&"tokens ".repeat(300)).unwrap().ids;
        let rows = FORWARD_TOKEN_BUDGET / long.len() + 3;
        let batch = vec![long.clone(); rows];
        let out = enc.embed(&batch).unwrap();
        let single = enc.embed(&[long]).unwrap();
        for v in &out {
            assert!(1.0 - cosine(v, &single[0]) < 1e-6);
        }
    }

    #[test]
    fn out_of_vocabulary_ids_and_empty_inputs_are_refused() {
        let enc = encoder();
        let bad = enc.wrap(&[enc.vocab_size() as u32]);
        assert_eq!(enc.embed(&[bad.ids]).unwrap_err().code(), "invalid_step");
        assert_eq!(enc.embed(&[Vec::new()]).unwrap_err().code(), "invalid_step");
        assert!(enc.embed(&[]).unwrap().is_empty());
    }

    #[test]
    fn a_directory_without_weights_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = SentenceEncoder::load(dir.path()).err().unwrap().to_string();
        assert!(err.contains("config.json"), "{err}");
    }
}
