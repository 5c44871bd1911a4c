//! Examples as token ids (the serving chat template, the answer closed by the end-of-turn
//! token), padded micro-batches, and the per-token log-probabilities both losses start from.

use candle_core::{Device, Tensor, D};
use runtime::llama::{ChatTemplate, Llama};
use runtime::lora::AdapterWeights;
use tokenizers::Tokenizer;

use crate::dataset::Message;
use crate::error::FinetuneError;

/// A prompt followed by an answer; only the answer's tokens are scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq {
    pub ids: Vec<u32>,
    /// Index in `ids` of the answer's first token.
    pub answer_start: usize,
}

impl Seq {
    pub fn answer_tokens(&self) -> usize {
        self.ids.len() - self.answer_start
    }
}

/// Turns messages and answers into ids exactly as the gateway would render the prompt.
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    pub eos: u32,
}

impl Encoder<'_> {
    pub fn prompt_ids(&self, prompt: &[Message]) -> Result<Vec<u32>, String> {
        let text = self.template.render(prompt.iter().map(|m| (m.role.as_str(), m.content.as_str())))?;
        let enc = self.tokenizer.encode(text, false).map_err(|e| format!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The answer's ids followed by the end-of-turn token, so the model learns to stop.
    pub fn answer_ids(&self, answer: &str) -> Result<Vec<u32>, String> {
        let enc = self.tokenizer.encode(answer, false).map_err(|e| format!("tokenizer: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        ids.push(self.eos);
        Ok(ids)
    }

    pub fn seq(&self, prompt: &[u32], answer: &str) -> Result<Seq, String> {
        let mut ids = prompt.to_vec();
        ids.extend(self.answer_ids(answer)?);
        Ok(Seq { ids, answer_start: prompt.len() })
    }
}

/// A padded micro-batch: `tokens` `[b, t]`, and for every scored answer token its flattened
/// position (`row·t + i - 1`, the position that predicts it), its id and its sequence.
pub struct Batch {
    pub tokens: Tensor,
    pub positions: Tensor,
    pub targets: Tensor,
    pub seq_of: Tensor,
    pub rows: usize,
    pub scored: usize,
    pub tokens_in: usize,
}

impl Batch {
    /// Right-padded with id 0: causal attention means padding after a sequence never changes
    /// what its real positions see, and padded positions are never scored.
    pub fn new(seqs: &[&Seq]) -> Result<Self, FinetuneError> {
        let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(1);
        let mut tokens = vec![0u32; seqs.len() * t];
        let (mut positions, mut targets, mut seq_of) = (Vec::new(), Vec::new(), Vec::new());
        let mut tokens_in = 0;
        for (row, s) in seqs.iter().enumerate() {
            tokens[row * t..row * t + s.ids.len()].copy_from_slice(&s.ids);
            tokens_in += s.ids.len();
            for i in s.answer_start.max(1)..s.ids.len() {
                positions.push((row * t + i - 1) as u32);
                targets.push(s.ids[i]);
                seq_of.push(row as u32);
            }
        }
        let dev = Device::Cpu;
        let e = |e: candle_core::Error| FinetuneError::Training { detail: e.to_string() };
        let scored = positions.len();
        Ok(Self {
            tokens: Tensor::from_vec(tokens, (seqs.len(), t), &dev).map_err(e)?,
            positions: Tensor::from_vec(positions, scored, &dev).map_err(e)?,
            targets: Tensor::from_vec(targets, scored, &dev).map_err(e)?,
            seq_of: Tensor::from_vec(seq_of, scored, &dev).map_err(e)?,
            rows: seqs.len(),
            scored,
            tokens_in,
        })
    }

    /// `log p(answer token)` at every scored position, `[scored]`. The LM head runs only on
    /// those positions.
    pub fn token_logprobs(&self, model: &Llama, adapter: Option<&AdapterWeights>) -> candle_core::Result<Tensor> {
        let hidden = model.forward_hidden(&self.tokens, adapter).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (b, t, h) = hidden.dims3()?;
        let picked = hidden.reshape((b * t, h))?.index_select(&self.positions, 0)?;
        let logits = model.logits_rows(&picked).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        logp.gather(&self.targets.unsqueeze(1)?, 1)?.squeeze(1)
    }

    /// Sum of the scored log-probabilities of each sequence, `[rows]`.
    pub fn sequence_logprobs(&self, token_logprobs: &Tensor) -> candle_core::Result<Tensor> {
        Tensor::zeros(self.rows, token_logprobs.dtype(), token_logprobs.device())?.index_add(
            &self.seq_of,
            token_logprobs,
            0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answer_positions_are_scored_and_padding_is_not() {
        let a = Seq { ids: vec![5, 6, 7, 8], answer_start: 2 };
        let b = Seq { ids: vec![9, 10, 11], answer_start: 1 };
        let batch = Batch::new(&[&a, &b]).unwrap();
        assert_eq!(batch.tokens.to_vec2::<u32>().unwrap(), vec![vec![5, 6, 7, 8], vec![9, 10, 11, 0]]);
        assert_eq!(batch.positions.to_vec1::<u32>().unwrap(), vec![1, 2, 4, 5]);
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![7, 8, 10, 11]);
        assert_eq!(batch.seq_of.to_vec1::<u32>().unwrap(), vec![0, 0, 1, 1]);
        assert_eq!(batch.scored, a.answer_tokens() + b.answer_tokens());
    }
}
