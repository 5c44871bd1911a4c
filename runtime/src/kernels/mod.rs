//! Matrix kernels for serving: GGUF weights kept packed (Q4_1, Q8_0) or dense, multiplied
//! against f32 activations with SIMD chosen at run time, split across cores with rayon.
//!
//! Activations stay f32 on purpose: llama.cpp rounds them to 8 bits before its integer dot
//! products, and on SmolLM2-135M that rounding alone moves logits by ~0.2 and can change
//! greedy answers. Here the weights are dequantized in registers to exactly the values
//! `QTensor::dequantize` gives, so the only difference from a dense f32 matmul is the order of
//! the additions. (The AVX2 kernels for one to three rows factor each block's scale and
//! minimum out of its sum instead, `d·Σq·x + m·Σx`: the same sum, rounded differently, with
//! half the arithmetic per block.) Rounding activations to 8 bits, as llama.cpp does, is an
//! opt-in per matrix ([`Activations::Q8`], see `q8.rs`) for machines whose batches are bound
//! by the f32 arithmetic.

mod low_rank;
mod pack;
mod q8;
mod served;
mod tiles;
mod vector;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use low_rank::{prefetch, x_a_t, LowRank, PREFETCH_L1, PREFETCH_L2, XA_ROWS};
pub use q8::Activations;
pub use served::{to_bf16_bits, Served, Weight, PANEL};
pub use vector::{attention_scores_64, attention_values_64, axpy, dot};

/// Elements per GGML block for the packed formats here.
pub const BLOCK: usize = 32;

/// Most activation rows one fused kernel call takes (AVX-512 and AVX2; portable takes 4).
const FUSED_ROWS: usize = 8;

/// A [`QMatrix`]'s weights as the kernels read them.
#[derive(Debug, Clone)]
enum Packed {
    /// Per block: scale `d`, minimum `m`, 16 bytes of nibbles (low nibbles are elements
    /// 0..16, high nibbles 16..32); value = `d·q + m`.
    Q4_1 { d: Vec<f32>, m: Vec<f32>, qs: Vec<u8> },
    /// Per block: scale `d` and 32 signed bytes; value = `d·q`.
    Q8_0 { d: Vec<f32>, qs: Vec<i8> },
    /// Row-major `[rows, cols]`.
    F32(Vec<f32>),
}

/// A `[rows, cols]` weight matrix (rows are output features), as the serving kernels hold it.
#[derive(Debug, Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    packed: Packed,
    /// What the fused kernels multiply packed weights against (prompts always take f32).
    activations: Activations,
}

/// Which instruction set the kernels use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// Detected once; every kernel dispatches on it.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("SWITCHYARD_KERNELS").is_some_and(|v| v == "portable") {
                return Isa::Portable;
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// A matmul's output, which parallel tasks write disjoint elements of.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements through it (see `matmul`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

#[cfg(test)]
mod tests;
