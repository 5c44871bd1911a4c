//! AVX2 and AVX-512 versions of the fused dequantize-and-dot kernels.
//!
//! Each kernel walks one weight row block by block, turns the block's integers into f32 once,
//! and multiplies them against up to four activation rows, so one pass over the (packed)
//! weights serves every row of a small decode batch.

use std::arch::x86_64::*;

use super::{BLOCK, FUSED_ROWS};

macro_rules! dispatch_rows {
    ($kernel:ident, $q:expr, $d:expr, $x:expr, $cols:expr, $n:expr, $acc:expr) => {
        match $n {
            1 => $kernel::<1>($q, $d, $x, $cols, $acc),
            2 => $kernel::<2>($q, $d, $x, $cols, $acc),
            3 => $kernel::<3>($q, $d, $x, $cols, $acc),
            _ => $kernel::<4>($q, $d, $x, $cols, $acc),
        }
    };
}

/// # Safety
/// The CPU must support AVX2 and FMA; `q` holds `d.len()` blocks of 16 bytes and `x` holds
/// `n` rows of `cols = d.len() * 32` floats.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn q4_1_avx2(q: &[u8], d: &[f32], x: &[f32], cols: usize, n: usize, acc: &mut [f32; FUSED_ROWS]) {
    debug_assert!(q.len() >= d.len() * 16 && x.len() >= n * cols && cols >= d.len() * BLOCK);
    // SAFETY: forwarded from the caller.
    unsafe { dispatch_rows!(q4_1_avx2_n, q, d, x, cols, n, acc) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q4_1_avx2_n<const N: usize>(q: &[u8], d: &[f32], x: &[f32], cols: usize, acc: &mut [f32; FUSED_ROWS]) {
    // SAFETY: every pointer below stays inside `q` (16 bytes per block) and `x` (N rows of
    // `cols` floats), as the caller guarantees.
    unsafe {
        let mask = _mm_set1_epi8(0x0F);
        let mut sums = [_mm256_setzero_ps(); N];
        let (qp, xp) = (q.as_ptr(), x.as_ptr());
        for (b, &db) in d.iter().enumerate() {
            let raw = _mm_loadu_si128(qp.add(b * 16) as *const __m128i);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            let w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            let w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            let w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            let w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
            let scale = _mm256_set1_ps(db);
            for (i, s) in sums.iter_mut().enumerate() {
                let xb = xp.add(i * cols + b * BLOCK);
                let mut t = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
                t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb.add(8)), t);
                t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb.add(16)), t);
                t = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb.add(24)), t);
                *s = _mm256_fmadd_ps(scale, t, *s);
            }
        }
        for (a, s) in acc.iter_mut().zip(sums) {
            *a = hsum256(s);
        }
    }
}

/// # Safety
/// As for [`q4_1_avx2`], with AVX-512F and AVX-512BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn q4_1_avx512(q: &[u8], d: &[f32], x: &[f32], cols: usize, n: usize, acc: &mut [f32; FUSED_ROWS]) {
    debug_assert!(q.len() >= d.len() * 16 && x.len() >= n * cols && cols >= d.len() * BLOCK);
    // SAFETY: forwarded from the caller.
    unsafe { dispatch_rows!(q4_1_avx512_n, q, d, x, cols, n, acc) }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn q4_1_avx512_n<const N: usize>(q: &[u8], d: &[f32], x: &[f32], cols: usize, acc: &mut [f32; FUSED_ROWS]) {
    // SAFETY: as in `q4_1_avx2_n`.
    unsafe {
        let mask = _mm_set1_epi8(0x0F);
        let mut sums = [_mm512_setzero_ps(); N];
        let (qp, xp) = (q.as_ptr(), x.as_ptr());
        for (b, &db) in d.iter().enumerate() {
            let raw = _mm_loadu_si128(qp.add(b * 16) as *const __m128i);
            let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask)));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask)));
            let scale = _mm512_set1_ps(db);
            for (i, s) in sums.iter_mut().enumerate() {
                let xb = xp.add(i * cols + b * BLOCK);
                let t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb.add(16)), _mm512_mul_ps(lo, _mm512_loadu_ps(xb)));
                *s = _mm512_fmadd_ps(scale, t, *s);
            }
        }
        for (a, s) in acc.iter_mut().zip(sums) {
            *a = _mm512_reduce_add_ps(s);
        }
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA; `q` holds `d.len() * 32` values and `x` holds `n` rows
/// of `cols = d.len() * 32` floats.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn q8_0_avx2(q: &[i8], d: &[f32], x: &[f32], cols: usize, n: usize, acc: &mut [f32; FUSED_ROWS]) {
    debug_assert!(q.len() >= d.len() * BLOCK && x.len() >= n * cols);
    // SAFETY: forwarded from the caller.
    unsafe { dispatch_rows!(q8_0_avx2_n, q, d, x, cols, n, acc) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q8_0_avx2_n<const N: usize>(q: &[i8], d: &[f32], x: &[f32], cols: usize, acc: &mut [f32; FUSED_ROWS]) {
    // SAFETY: every pointer stays inside `q` and `x`, as the caller guarantees.
    unsafe {
        let mut sums = [_mm256_setzero_ps(); N];
        let (qp, xp) = (q.as_ptr(), x.as_ptr());
        for (b, &db) in d.iter().enumerate() {
            let qb = qp.add(b * BLOCK);
            let w = |o: usize| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(qb.add(o) as *const __m128i)));
            let (w0, w1, w2, w3) = (w(0), w(8), w(16), w(24));
            let scale = _mm256_set1_ps(db);
            for (i, s) in sums.iter_mut().enumerate() {
                let xb = xp.add(i * cols + b * BLOCK);
                let mut t = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
                t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb.add(8)), t);
                t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb.add(16)), t);
                t = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb.add(24)), t);
                *s = _mm256_fmadd_ps(scale, t, *s);
            }
        }
        for (a, s) in acc.iter_mut().zip(sums) {
            *a = hsum256(s);
        }
    }
}

/// # Safety
/// As for [`q8_0_avx2`], with AVX-512F and AVX-512BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn q8_0_avx512(q: &[i8], d: &[f32], x: &[f32], cols: usize, n: usize, acc: &mut [f32; FUSED_ROWS]) {
    debug_assert!(q.len() >= d.len() * BLOCK && x.len() >= n * cols);
    // SAFETY: forwarded from the caller.
    unsafe { dispatch_rows!(q8_0_avx512_n, q, d, x, cols, n, acc) }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn q8_0_avx512_n<const N: usize>(q: &[i8], d: &[f32], x: &[f32], cols: usize, acc: &mut [f32; FUSED_ROWS]) {
    // SAFETY: as in `q8_0_avx2_n`.
    unsafe {
        let mut sums = [_mm512_setzero_ps(); N];
        let (qp, xp) = (q.as_ptr(), x.as_ptr());
        for (b, &db) in d.iter().enumerate() {
            let qb = qp.add(b * BLOCK);
            let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qb as *const __m128i)));
            let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qb.add(16) as *const __m128i)));
            let scale = _mm512_set1_ps(db);
            for (i, s) in sums.iter_mut().enumerate() {
                let xb = xp.add(i * cols + b * BLOCK);
                let t = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb.add(16)), _mm512_mul_ps(w0, _mm512_loadu_ps(xb)));
                *s = _mm512_fmadd_ps(scale, t, *s);
            }
        }
        for (a, s) in acc.iter_mut().zip(sums) {
            *a = _mm512_reduce_add_ps(s);
        }
    }
}

#[target_feature(enable = "avx2,fma")]
fn hsum256(v: __m256) -> f32 {
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(_mm256_castps256_ps128(v), hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}
