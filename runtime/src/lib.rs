//! The LoRA-aware llama runtime that serving and training both run.
//!
//! This crate owns:
//! - the LoRA maths ([`lora`]): [`lora::LoraLinear`] wraps a frozen base linear and applies
//!   per-row adapters; [`lora::AdapterWeights`] is one adapter version loaded from its PEFT
//!   files; [`frozen::FrozenLinear`] is the frozen base linear that training back-propagates
//!   through, and [`train_ops`] the fused RMSNorm, RoPE, causal softmax and SwiGLU with
//!   hand-written backward passes that training runs on;
//! - the llama decoder built from it ([`llama::Llama`], loaded from GGUF or HF safetensors, with
//!   its tokenizer and chat template as [`llama::ChatModel`]), and the serving runtime
//!   ([`llama::Runtime`]) that runs the same model on packed quantized weights, one batch of
//!   sequences a step, each with its own [`llama::KvCache`] and adapter, plus the prompt
//!   [`llama::PrefixCache`];
//! - the matrix and attention kernels those run on ([`kernels`]: [`kernels::QMatrix`], SIMD
//!   chosen at run time);
//! - the BERT sentence encoder that serves embeddings ([`bert::SentenceEncoder`]: tokenizer,
//!   [`bert::Bert`], mean pooling and L2 normalisation, as sentence-transformers computes them);
//! - the export of an adapter merged into its base model ([`export::export`]: an HF safetensors
//!   directory and llama.cpp-loadable GGUF files, with a manifest);
//! - tiny deterministic models and adapters written to disk for tests ([`testing`]).
//!
//! Errors are one enum, [`RuntimeError`], with stable [`RuntimeError::code`] strings; reading
//! an adapter's own files fails with the format's [`adapters::AdapterError`].
//!
//! What an adapter is (the PEFT format, validation, shapes) is the `adapters` crate's; this
//! crate reads adapters through it. It must never:
//! - speak HTTP or import actix or tokio (the gateway serves; this crate computes);
//! - write to the adapter registry or move an alias (versions are the registry's, and the
//!   runtime only loads directories it is given);
//! - change a kernel's arithmetic without the exactness tests that pin its bits.

pub mod bert;
mod error;
pub mod export;
pub mod frozen;
pub mod kernels;
pub mod llama;
pub mod lora;
pub mod testing;
pub mod train_ops;

pub use error::{Result, RuntimeError};
