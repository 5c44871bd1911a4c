//! Vector primitives of the forward pass: dot products, `y += a·x`, and the AVX-512 attention
//! kernels' dispatch.

#[cfg(target_arch = "x86_64")]
use super::{isa, x86, Isa};

/// Attention scores for `R ≤ 4` query heads of width 64 on AVX-512 machines (see
/// `x86::attention_scores_avx512` for the layout); `false`, untouched, elsewhere, where the
/// caller's portable loop runs instead. Same bits either way.
pub fn attention_scores_64<const R: usize>(
    k: &[f32],
    stride: usize,
    q: &[f32],
    keys: usize,
    scores: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: AVX-512F was detected; the kernel checks every length it relies on.
        unsafe { x86::attention_scores_avx512::<R>(k, stride, q, keys, scores) };
        return true;
    }
    let _ = (k, stride, q, keys, scores);
    false
}

/// The values half of attention for `R ≤ 4` heads of width 64 on AVX-512 machines (see
/// `x86::attention_values_avx512`); `false`, untouched, elsewhere. Same bits either way.
pub fn attention_values_64<const R: usize>(v: &[f32], stride: usize, w: &[f32], keys: usize, dst: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: AVX-512F was detected; the kernel checks every length it relies on.
        unsafe { x86::attention_values_avx512::<R>(v, stride, w, keys, dst) };
        return true;
    }
    let _ = (v, stride, w, keys, dst);
    false
}

/// A dot product written so that the compiler keeps 16 independent lanes (and so vectorizes).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for j in 0..16 {
            acc[j] = x[j].mul_add(y[j], acc[j]);
        }
    }
    let mut total: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        total = x.mul_add(*y, total);
    }
    total
}

/// `y += a · x`, vectorized.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv = a.mul_add(*xv, *yv);
    }
}
