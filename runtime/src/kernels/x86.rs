//! AVX2 and AVX-512 versions of the fused dequantize-and-dot kernels.
//!
//! Each kernel walks one weight row block by block, turns the block into its exact f32
//! weights once (the same `q·d + m` a dense dequantization gives), and multiplies them against
//! up to eight activation rows with FMAs, so one pass over the packed weights serves every row
//! of a decode batch. For one to three rows, the scaled kernels instead multiply the integer
//! codes and scale each block's sum (see [`scaled_kernels`]).

use std::arch::x86_64::*;

use super::{BLOCK, FUSED_ROWS};

macro_rules! dispatch_rows {
    ($kernel:ident, $($arg:expr),+; $n:expr) => {
        match $n {
            1 => $kernel::<1>($($arg),+),
            2 => $kernel::<2>($($arg),+),
            3 => $kernel::<3>($($arg),+),
            4 => $kernel::<4>($($arg),+),
            5 => $kernel::<5>($($arg),+),
            6 => $kernel::<6>($($arg),+),
            7 => $kernel::<7>($($arg),+),
            _ => $kernel::<8>($($arg),+),
        }
    };
}

/// Dequantizes Q4_1 blocks into `out` (32 floats per block) as `q·d + m`, multiplied and
/// added separately so the values equal the scalar (and candle's) dequantization bit for bit.
///
/// # Safety
/// The CPU must support AVX-512F/BW; `q` holds `d.len()` blocks of 16 bytes, `m` and `out`
/// match `d`.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn dequant_q4_1_avx512(q: &[u8], d: &[f32], m: &[f32], out: &mut [f32]) {
    debug_assert!(q.len() >= d.len() * 16 && m.len() >= d.len() && out.len() >= d.len() * BLOCK);
    // SAFETY: every pointer stays inside the slices, as the caller guarantees.
    unsafe {
        let op = out.as_mut_ptr();
        for b in 0..d.len() {
            let (lo, hi) = q4_1_block(q.as_ptr(), d.as_ptr(), m.as_ptr(), b);
            _mm512_storeu_ps(op.add(b * BLOCK), lo);
            _mm512_storeu_ps(op.add(b * BLOCK + 16), hi);
        }
    }
}

/// Dequantizes Q8_0 blocks into `out` as `q·d`.
///
/// # Safety
/// As for [`dequant_q4_1_avx512`], with `q` holding `d.len() * 32` values.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn dequant_q8_0_avx512(q: &[i8], d: &[f32], out: &mut [f32]) {
    debug_assert!(q.len() >= d.len() * BLOCK && out.len() >= d.len() * BLOCK);
    // SAFETY: as above.
    unsafe {
        let op = out.as_mut_ptr();
        for b in 0..d.len() {
            let (lo, hi) = q8_0_block(q.as_ptr(), d.as_ptr(), b);
            _mm512_storeu_ps(op.add(b * BLOCK), lo);
            _mm512_storeu_ps(op.add(b * BLOCK + 16), hi);
        }
    }
}

/// Block `b`'s 32 Q4_1 codes (0 to 15) as floats, elements 0..8, 8..16, 16..24 and 24..32.
///
/// # Safety
/// AVX2; block `b` exists behind `q` (16 bytes a block).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn q4_1_codes_avx2(q: *const u8, b: usize) -> [__m256; 4] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mask = _mm_set1_epi8(0x0F);
        let raw = _mm_loadu_si128(q.add(b * 16) as *const __m128i);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
        [f(lo), f(_mm_srli_si128(lo, 8)), f(hi), f(_mm_srli_si128(hi, 8))]
    }
}

/// Block `b` of a Q4_1 matrix as its exact weights, `q·d + m` multiplied and added separately
/// (so they equal the scalar and candle's dequantization bit for bit).
///
/// # Safety
/// AVX2; block `b` exists behind `q`, `d` and `m`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn q4_1_block_avx2(q: *const u8, d: *const f32, m: *const f32, b: usize) -> [__m256; 4] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let (db, mb) = (_mm256_set1_ps(*d.add(b)), _mm256_set1_ps(*m.add(b)));
        q4_1_codes_avx2(q, b).map(|v| _mm256_add_ps(_mm256_mul_ps(v, db), mb))
    }
}

/// Block `b`'s 32 Q8_0 codes as floats.
///
/// # Safety
/// AVX2; block `b` exists behind `q` (32 codes a block).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn q8_0_codes_avx2(q: *const i8, b: usize) -> [__m256; 4] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let qb = q.add(b * BLOCK);
        let f = |o: usize| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(qb.add(o) as *const __m128i)));
        [f(0), f(8), f(16), f(24)]
    }
}

/// Block `b` of a Q8_0 matrix as its exact weights, `q·d`.
///
/// # Safety
/// AVX2; block `b` exists behind `q` and `d`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn q8_0_block_avx2(q: *const i8, d: *const f32, b: usize) -> [__m256; 4] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let db = _mm256_set1_ps(*d.add(b));
        q8_0_codes_avx2(q, b).map(|v| _mm256_mul_ps(v, db))
    }
}

/// [`dequant_q4_1_avx512`] with AVX2.
///
/// # Safety
/// The CPU must support AVX2; `q` holds `d.len()` blocks of 16 bytes, `m` and `out` match `d`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dequant_q4_1_avx2(q: &[u8], d: &[f32], m: &[f32], out: &mut [f32]) {
    debug_assert!(q.len() >= d.len() * 16 && m.len() >= d.len() && out.len() >= d.len() * BLOCK);
    for b in 0..d.len() {
        // SAFETY: block b and its 32 outputs lie inside the slices, as the caller guarantees.
        unsafe {
            for (e, v) in q4_1_block_avx2(q.as_ptr(), d.as_ptr(), m.as_ptr(), b).into_iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(b * BLOCK + e * 8), v);
            }
        }
    }
}

/// [`dequant_q8_0_avx512`] with AVX2.
///
/// # Safety
/// The CPU must support AVX2; `q` holds `d.len() * 32` values and `out` as many floats.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dequant_q8_0_avx2(q: &[i8], d: &[f32], out: &mut [f32]) {
    debug_assert!(q.len() >= d.len() * BLOCK && out.len() >= d.len() * BLOCK);
    for b in 0..d.len() {
        // SAFETY: as above.
        unsafe {
            for (e, v) in q8_0_block_avx2(q.as_ptr(), d.as_ptr(), b).into_iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(b * BLOCK + e * 8), v);
            }
        }
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA; `q` holds `d.len()` blocks of 16 bytes and `x` holds
/// `n` rows of `cols = d.len() * 32` floats.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn q4_1_avx2(q: &[u8], d: &[f32], m: &[f32], x: &[f32], cols: usize, n: usize, acc: &mut [f32; FUSED_ROWS]) {
    debug_assert!(q.len() >= d.len() * 16 && x.len() >= n * cols && cols >= d.len() * BLOCK);
    // SAFETY: forwarded from the caller.
    unsafe { dispatch_rows!(q4_1_avx2_n, q, d, m, x, cols, acc; n) }
}

/// Accumulators per activation row in the AVX2 kernels: an FMA's result is ready only some
/// cycles after it issues, so one chain per row would leave the FMA units idle at one or two
/// rows; with at least eight chains in flight they stay busy (sixteen registers bound it).
pub(super) const fn avx2_chains(n: usize) -> usize {
    match n {
        0..=2 => 4,
        3..=4 => 2,
        _ => 1,
    }
}

/// One weight row (block `b` as four vectors of exact weights from `w(b)`) against `N`
/// activation rows; the block's quarters go round the row's chains.
///
/// # Safety
/// AVX2 and FMA; `w` must be valid for `nb` blocks; `x` holds N rows of `cols` floats.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn row_avx2<const N: usize>(
    w: impl Fn(usize) -> [__m256; 4],
    nb: usize,
    x: &[f32],
    cols: usize,
    acc: &mut [f32; FUSED_ROWS],
) {
    debug_assert!(x.len() >= N * cols && cols >= nb * BLOCK);
    let chains = const { avx2_chains(N) };
    // SAFETY: the loads stay inside N rows of `cols` floats.
    unsafe {
        let mut sums = [[_mm256_setzero_ps(); 4]; N];
        let xp = x.as_ptr();
        for b in 0..nb {
            let wb = w(b);
            for (i, s) in sums.iter_mut().enumerate() {
                let xb = xp.add(i * cols + b * BLOCK);
                for (quarter, wq) in wb.iter().enumerate() {
                    let c = quarter % chains;
                    s[c] = _mm256_fmadd_ps(*wq, _mm256_loadu_ps(xb.add(quarter * 8)), s[c]);
                }
            }
        }
        for (a, s) in acc.iter_mut().zip(sums) {
            let mut total = s[0];
            for v in &s[1..chains] {
                total = _mm256_add_ps(total, *v);
            }
            *a = hsum256(total);
        }
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn q4_1_avx2_n<const N: usize>(
    q: &[u8],
    d: &[f32],
    m: &[f32],
    x: &[f32],
    cols: usize,
    acc: &mut [f32; FUSED_ROWS],
) {
    let (qp, dp, mp) = (q.as_ptr(), d.as_ptr(), m.as_ptr());
    // SAFETY: the caller passes whole rows: d.len() blocks of 16 bytes behind `q`, one `d`
    // and `m` per block. The exact weights are shared by every row.
    unsafe { row_avx2::<N>(|b| q4_1_block_avx2(qp, dp, mp, b), d.len(), x, cols, acc) }
}

/// # Safety
/// As for [`q4_1_avx2`], with AVX-512F and AVX-512BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn q4_1_avx512(
    q: &[u8],
    d: &[f32],
    m: &[f32],
    x: &[f32],
    cols: usize,
    n: usize,
    acc: &mut [f32; FUSED_ROWS],
) {
    debug_assert!(q.len() >= d.len() * 16 && x.len() >= n * cols && cols >= d.len() * BLOCK);
    // SAFETY: forwarded from the caller.
    unsafe { dispatch_rows!(q4_1_avx512_n, q, d, m, x, cols, acc; n) }
}

/// Block `i`'s 32 Q4_1 codes (0 to 15) as two vectors of floats.
///
/// # Safety
/// AVX-512F/BW; block `i` exists behind `q` (16 bytes a block).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn q4_1_codes_avx512(q: *const u8, i: usize) -> [__m512; 2] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mask = _mm_set1_epi8(0x0F);
        let raw = _mm_loadu_si128(q.add(i * 16) as *const __m128i);
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask)));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask)));
        [lo, hi]
    }
}

/// Block `i` of a Q4_1 matrix as two vectors of exact weights (`q·d + m`, not fused).
///
/// # Safety
/// AVX-512F/BW; block `i` exists behind `q` (16 bytes a block), `d` and `m`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn q4_1_block(q: *const u8, d: *const f32, m: *const f32, i: usize) -> (__m512, __m512) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let (db, mb) = (_mm512_set1_ps(*d.add(i)), _mm512_set1_ps(*m.add(i)));
        let [lo, hi] = q4_1_codes_avx512(q, i);
        (_mm512_add_ps(_mm512_mul_ps(lo, db), mb), _mm512_add_ps(_mm512_mul_ps(hi, db), mb))
    }
}

/// Block `i`'s 32 Q8_0 codes as two vectors of floats.
///
/// # Safety
/// AVX-512F/BW; block `i` exists behind `q` (32 codes a block).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn q8_0_codes_avx512(q: *const i8, i: usize) -> [__m512; 2] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let qb = q.add(i * BLOCK);
        let f = |o: usize| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qb.add(o) as *const __m128i)));
        [f(0), f(16)]
    }
}

/// Block `i` of a Q8_0 matrix as two vectors of exact weights (`q·d`).
///
/// # Safety
/// AVX-512F/BW; block `i` exists behind `q` (32 values a block) and `d`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn q8_0_block(q: *const i8, d: *const f32, i: usize) -> (__m512, __m512) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let db = _mm512_set1_ps(*d.add(i));
        let [w0, w1] = q8_0_codes_avx512(q, i);
        (_mm512_mul_ps(w0, db), _mm512_mul_ps(w1, db))
    }
}

/// One weight row (blocks `w(0..nb)`) against `N` activation rows, two accumulators each.
///
/// # Safety
/// `w` must be valid for `nb` blocks; `x` holds N rows of `cols` floats.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn row_avx512<const N: usize>(
    w: impl Fn(usize) -> (__m512, __m512),
    nb: usize,
    x: &[f32],
    cols: usize,
    acc: &mut [f32; FUSED_ROWS],
) {
    debug_assert!(x.len() >= N * cols && cols >= nb * BLOCK);
    // SAFETY: the loads stay inside N rows of `cols` floats.
    unsafe {
        let mut sums = [[_mm512_setzero_ps(); 2]; N];
        let xp = x.as_ptr();
        for b in 0..nb {
            let (w0, w1) = w(b);
            for (i, s) in sums.iter_mut().enumerate() {
                let xb = xp.add(i * cols + b * BLOCK);
                s[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), s[0]);
                s[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb.add(16)), s[1]);
            }
        }
        for (a, s) in acc.iter_mut().zip(sums) {
            *a = _mm512_reduce_add_ps(_mm512_add_ps(s[0], s[1]));
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn q4_1_avx512_n<const N: usize>(
    q: &[u8],
    d: &[f32],
    m: &[f32],
    x: &[f32],
    cols: usize,
    acc: &mut [f32; FUSED_ROWS],
) {
    let (qp, dp, mp) = (q.as_ptr(), d.as_ptr(), m.as_ptr());
    // SAFETY: the caller passes whole rows: d.len() blocks behind every pointer.
    unsafe { row_avx512::<N>(|b| q4_1_block(qp, dp, mp, b), d.len(), x, cols, acc) }
}

#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn q8_0_avx512_n<const N: usize>(q: &[i8], d: &[f32], x: &[f32], cols: usize, acc: &mut [f32; FUSED_ROWS]) {
    let (qp, dp) = (q.as_ptr(), d.as_ptr());
    // SAFETY: as above.
    unsafe { row_avx512::<N>(|b| q8_0_block(qp, dp, b), d.len(), x, cols, acc) }
}

/// # Safety
/// The CPU must support AVX2 and FMA; `q` holds `d.len() * 32` values and `x` holds `n` rows
/// of `cols = d.len() * 32` floats.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn q8_0_avx2(q: &[i8], d: &[f32], x: &[f32], cols: usize, n: usize, acc: &mut [f32; FUSED_ROWS]) {
    debug_assert!(q.len() >= d.len() * BLOCK && x.len() >= n * cols);
    // SAFETY: forwarded from the caller.
    unsafe { dispatch_rows!(q8_0_avx2_n, q, d, x, cols, acc; n) }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn q8_0_avx2_n<const N: usize>(q: &[i8], d: &[f32], x: &[f32], cols: usize, acc: &mut [f32; FUSED_ROWS]) {
    let (qp, dp) = (q.as_ptr(), d.as_ptr());
    // SAFETY: the caller passes whole rows: d.len() blocks of 32 values behind `q`.
    unsafe { row_avx2::<N>(|b| q8_0_block_avx2(qp, dp, b), d.len(), x, cols, acc) }
}

/// # Safety
/// As for [`q8_0_avx2`], with AVX-512F and AVX-512BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn q8_0_avx512(q: &[i8], d: &[f32], x: &[f32], cols: usize, n: usize, acc: &mut [f32; FUSED_ROWS]) {
    debug_assert!(q.len() >= d.len() * BLOCK && x.len() >= n * cols);
    // SAFETY: forwarded from the caller.
    unsafe { dispatch_rows!(q8_0_avx512_n, q, d, x, cols, acc; n) }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn hsum256(v: __m256) -> f32 {
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(_mm256_castps256_ps128(v), hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

macro_rules! tile_kernel {
    ($(#[$doc:meta])* $name:ident, $feat:literal, $group:expr, |$qr:ident, $dr:ident, $mr:ident, $xg:ident, $cols:ident, $acc:ident, $gn:ident| $call:expr, $q:ty, $qrow:expr, $has_m:tt) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// The CPU must have the kernel's features; `q`, `d` (and `m`) hold rows `r0..r1` of a
        /// matrix with `nb` blocks per row, `x` holds `n` rows of `nb · 32` floats, and `out`
        /// is valid for `out[i · ldy + r]` for every `i < n` and `r` in `r0..r1`, which no other
        /// thread touches meanwhile.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $name(q: &[$q], d: &[f32], m: &[f32], nb: usize, r0: usize, r1: usize, x: &[f32], n: usize, out: *mut f32, ldy: usize) {
            let $cols = nb * BLOCK;
            // Groups outside, weight rows inside: a group's activations (up to 48 KB for 8
            // rows of 1,536) stay in L1 while the tile's weights stream past them, rather than
            // every group being reloaded from L2 for each weight row.
            let mut g0 = 0;
            while g0 < n {
                let $gn = (n - g0).min($group);
                let $xg = &x[g0 * $cols..];
                for r in r0..r1 {
                    let $qr = &q[r * nb * $qrow..(r + 1) * nb * $qrow];
                    let $dr = &d[r * nb..(r + 1) * nb];
                    let $mr = if $has_m { &m[r * nb..(r + 1) * nb] } else { m };
                    let mut $acc = [0f32; FUSED_ROWS];
                    // SAFETY: forwarded from the caller.
                    unsafe { $call };
                    for (i, a) in $acc.iter().enumerate().take($gn) {
                        // SAFETY: forwarded from the caller.
                        unsafe { *out.add((g0 + i) * ldy + r) = *a };
                    }
                }
                g0 += $gn;
            }
        }
    };
}

tile_kernel!(
    /// Q4_1 rows against up to `n` activation rows, eight at a time.
    q4_1_tile_avx512, "avx512f,avx512bw", FUSED_ROWS,
    |qr, dr, mr, xg, cols, acc, gn| dispatch_rows!(q4_1_avx512_n, qr, dr, mr, xg, cols, &mut acc; gn), u8, 16, true
);
tile_kernel!(
    /// Q8_0 rows against up to `n` activation rows, eight at a time (`m` is unused).
    q8_0_tile_avx512, "avx512f,avx512bw", FUSED_ROWS,
    |qr, dr, mr, xg, cols, acc, gn| { let _ = mr; dispatch_rows!(q8_0_avx512_n, qr, dr, xg, cols, &mut acc; gn) }, i8, BLOCK, false
);
tile_kernel!(
    /// Q4_1 rows against up to `n` activation rows, eight at a time.
    q4_1_tile_avx2, "avx2,fma", FUSED_ROWS,
    |qr, dr, mr, xg, cols, acc, gn| q4_1_avx2(qr, dr, mr, xg, cols, gn, &mut acc), u8, 16, true
);
tile_kernel!(
    /// Q8_0 rows against up to `n` activation rows, eight at a time (`m` is unused).
    q8_0_tile_avx2, "avx2,fma", FUSED_ROWS,
    |qr, dr, mr, xg, cols, acc, gn| { let _ = mr; q8_0_avx2(qr, dr, xg, cols, gn, &mut acc) }, i8, BLOCK, false
);

/// Two adjacent weight rows against `N` activation rows: each activation load feeds two FMAs,
/// halving loads per FMA against the one-row kernels. `w(row, b)` gives block `b` of weight
/// row `row` (0 or 1) as two vectors of exact f32 weights.
///
/// # Safety
/// `w` must be valid for both rows and `nb` blocks; `x` holds N rows of `cols` floats.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
#[allow(clippy::needless_range_loop)] // `i` indexes both rows' sums and the activation rows
unsafe fn pair_avx512<const N: usize>(
    w: impl Fn(usize, usize) -> (__m512, __m512),
    nb: usize,
    x: *const f32,
    cols: usize,
    acc: &mut [[f32; FUSED_ROWS]; 2],
) {
    // SAFETY: the pointers cover N rows of `cols` floats, as the caller guarantees.
    unsafe {
        let mut sums = [[_mm512_setzero_ps(); N]; 2];
        for b in 0..nb {
            let (a0, a1) = w(0, b);
            let (b0, b1) = w(1, b);
            for i in 0..N {
                let xb = x.add(i * cols + b * BLOCK);
                let (x0, x1) = (_mm512_loadu_ps(xb), _mm512_loadu_ps(xb.add(16)));
                sums[0][i] = _mm512_fmadd_ps(a1, x1, _mm512_fmadd_ps(a0, x0, sums[0][i]));
                sums[1][i] = _mm512_fmadd_ps(b1, x1, _mm512_fmadd_ps(b0, x0, sums[1][i]));
            }
        }
        if N >= 4 {
            // All 2·N sums at once (the slots past N stay zero and are not read).
            let mut all = [_mm512_setzero_ps(); 16];
            for (r, row) in sums.iter().enumerate() {
                all[r * FUSED_ROWS..r * FUSED_ROWS + N].copy_from_slice(row);
            }
            let totals = reduce16_avx512(all);
            for (r, row) in acc.iter_mut().enumerate() {
                for (i, a) in row.iter_mut().enumerate().take(N) {
                    *a = totals[reduced_lane(r * FUSED_ROWS + i)];
                }
            }
        } else {
            for (r, row) in sums.iter().enumerate() {
                for (i, s) in row.iter().enumerate() {
                    acc[r][i] = _mm512_reduce_add_ps(*s);
                }
            }
        }
    }
}

/// The lane of [`reduce16_avx512`]'s result that holds vector `k`'s sum.
#[inline(always)]
pub(super) const fn reduced_lane(k: usize) -> usize {
    4 * (k % 4) + k / 4
}

/// The lane sums of 16 vectors, vector `k`'s in lane [`reduced_lane`]`(k)`, each added in
/// `_mm512_reduce_add_ps`'s order (lane `i` plus lane `i + 8`, then `+ 4`, `+ 2`, `+ 1`; the
/// same bits, which a test checks) but for all 16 together: four rounds of two shuffles and an
/// add per pair of vectors (45 operations) instead of 16 separate reductions (about 130).
///
/// # Safety
/// AVX-512F must be available.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn reduce16_avx512(v: [__m512; 16]) -> [f32; 16] {
    // (Plain loops, not closures: a closure is a function of its own that need not inherit
    // this one's target features, and it took vectors through memory once before.)
    // Round 1: 128-bit chunks 0,1 of a pair against chunks 2,3: lanes i + (i + 8).
    let mut r1 = [_mm512_setzero_ps(); 8];
    for (k, r) in r1.iter_mut().enumerate() {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        *r = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
    }
    // Round 2: chunks 0,2 against 1,3: lanes i + (i + 4); four vectors' partial sums a register.
    let mut r2 = [_mm512_setzero_ps(); 4];
    for (k, r) in r2.iter_mut().enumerate() {
        let (a, b) = (r1[2 * k], r1[2 * k + 1]);
        *r = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b));
    }
    // Round 3: within 128-bit chunks, elements 0,1 against 2,3.
    let mut r3 = [_mm512_setzero_ps(); 2];
    for (k, r) in r3.iter_mut().enumerate() {
        let (a, b) = (r2[2 * k], r2[2 * k + 1]);
        *r = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b));
    }
    // Round 4: elements 0,2 against 1,3.
    let total = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(r3[0], r3[1]), _mm512_shuffle_ps::<0xDD>(r3[0], r3[1]));
    let mut out = [0f32; 16];
    // SAFETY: `out` holds 16 floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), total) };
    out
}

/// Rows `r0..r1` in pairs against `n` activation rows, up to eight at a time; `w(r, b)` decodes
/// block `b` of weight row `r`. An odd last row goes through `single`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn tile_pairs_avx512(
    w: impl Fn(usize, usize) -> (__m512, __m512) + Copy,
    nb: usize,
    r0: usize,
    r1: usize,
    x: &[f32],
    n: usize,
    out: *mut f32,
    ldy: usize,
    single: impl FnOnce(usize),
) {
    assert!(x.len() >= n * nb * BLOCK);
    let cols = nb * BLOCK;
    let mut r = r0;
    while r + 1 < r1 {
        let wr = move |row: usize, b: usize| w(r + row, b);
        let mut g0 = 0;
        while g0 < n {
            let gn = (n - g0).min(FUSED_ROWS);
            let mut acc = [[0f32; FUSED_ROWS]; 2];
            // SAFETY: rows r and r + 1 exist (the caller checked r1), as do activation rows
            // g0..g0 + gn; `out` is the caller's.
            unsafe {
                let xp = x.as_ptr().add(g0 * cols);
                match gn {
                    1 => pair_avx512::<1>(wr, nb, xp, cols, &mut acc),
                    2 => pair_avx512::<2>(wr, nb, xp, cols, &mut acc),
                    3 => pair_avx512::<3>(wr, nb, xp, cols, &mut acc),
                    4 => pair_avx512::<4>(wr, nb, xp, cols, &mut acc),
                    5 => pair_avx512::<5>(wr, nb, xp, cols, &mut acc),
                    6 => pair_avx512::<6>(wr, nb, xp, cols, &mut acc),
                    7 => pair_avx512::<7>(wr, nb, xp, cols, &mut acc),
                    _ => pair_avx512::<8>(wr, nb, xp, cols, &mut acc),
                }
                for i in 0..gn {
                    *out.add((g0 + i) * ldy + r) = acc[0][i];
                    *out.add((g0 + i) * ldy + r + 1) = acc[1][i];
                }
            }
            g0 += gn;
        }
        r += 2;
    }
    if r < r1 {
        single(r);
    }
}

/// Q4_1 rows `r0..r1` against `n` activation rows, two weight rows and up to eight activation
/// rows at a time.
///
/// # Safety
/// As for the tile kernels above.
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn q4_1_tile_pairs_avx512(
    q: &[u8],
    d: &[f32],
    m: &[f32],
    nb: usize,
    r0: usize,
    r1: usize,
    x: &[f32],
    n: usize,
    out: *mut f32,
    ldy: usize,
) {
    assert!(q.len() >= r1 * nb * 16 && d.len() >= r1 * nb && m.len() >= r1 * nb);
    let (qp, dp, mp) = (q.as_ptr(), d.as_ptr(), m.as_ptr());
    // SAFETY: block r·nb + b exists (checked above).
    let w = move |r: usize, b: usize| unsafe { q4_1_block(qp, dp, mp, r * nb + b) };
    // SAFETY: forwarded from the caller.
    unsafe {
        tile_pairs_avx512(w, nb, r0, r1, x, n, out, ldy, |r| q4_1_tile_avx512(q, d, m, nb, r, r + 1, x, n, out, ldy))
    }
}

/// Q8_0 rows `r0..r1` against `n` activation rows, two weight rows and up to eight activation
/// rows at a time.
///
/// # Safety
/// As for the tile kernels above.
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn q8_0_tile_pairs_avx512(
    q: &[i8],
    d: &[f32],
    nb: usize,
    r0: usize,
    r1: usize,
    x: &[f32],
    n: usize,
    out: *mut f32,
    ldy: usize,
) {
    assert!(q.len() >= r1 * nb * BLOCK && d.len() >= r1 * nb);
    let (qp, dp) = (q.as_ptr(), d.as_ptr());
    // SAFETY: as above.
    let w = move |r: usize, b: usize| unsafe { q8_0_block(qp, dp, r * nb + b) };
    // SAFETY: forwarded from the caller.
    unsafe {
        tile_pairs_avx512(w, nb, r0, r1, x, n, out, ldy, |r| q8_0_tile_avx512(q, d, &[], nb, r, r + 1, x, n, out, ldy))
    }
}

/// The `x·Aᵀ` kernels for one instruction set: `$block::<R, J>` takes `J` rows of A (from
/// `j`) against `R` rows of `x` over the first `in_dim / LANES · LANES` columns, where
/// `a(row, k)` gives A's elements `k..k + LANES` of `row` as f32 (each activation load feeds
/// `J` FMAs); `$rows::<R>` takes every row of A, two at a time; `$any` picks `R` from `rows`.
/// Their safety contract: the CPU has `$feat`; `x` holds `R` rows of `in_dim` floats, `a` is
/// valid for A's `rank` rows and those columns, and `t` for `t[r · rank + j]`, `r < R`.
macro_rules! x_a_t_kernels {
    ($feat:literal, $v:ty, $lanes:expr, $zero:path, $loadx:path, $fma:path, $reduce:path, $block:ident, $rows:ident, $any:ident,
     $f32_name:ident, $bf16_name:ident, |$p:ident| $widen:expr) => {
        /// `t[r · rank + j] = x[r] · a[j]` over the first `in_dim / LANES · LANES` columns,
        /// which it returns (the caller adds the rest), for `rows ≤ 4` rows of `x`; A is
        /// `[rank, in_dim]`, f32.
        ///
        /// # Safety
        /// The CPU has the kernel's features; `x` holds `rows` rows of `in_dim` floats, `a`
        /// `rank · in_dim` and `t` `rows · rank`.
        #[target_feature(enable = $feat)]
        pub unsafe fn $f32_name(x: &[f32], in_dim: usize, rows: usize, a: &[f32], rank: usize, t: &mut [f32]) -> usize {
            debug_assert!(x.len() >= rows * in_dim && a.len() >= rank * in_dim && t.len() >= rows * rank);
            let (ap, xp, tp) = (a.as_ptr(), x.as_ptr(), t.as_mut_ptr());
            // SAFETY: the loads stay inside A's `rank` rows, as the caller guarantees.
            let load = |j: usize, k: usize| unsafe { $loadx(ap.add(j * in_dim + k)) };
            // SAFETY: forwarded from the caller.
            unsafe { $any(load, xp, in_dim, rows, rank, tp) };
            in_dim / $lanes * $lanes
        }

        /// The same for A held as bf16 bit patterns (widened exactly in registers).
        ///
        /// # Safety
        /// As for the f32 version.
        #[target_feature(enable = $feat)]
        pub unsafe fn $bf16_name(
            x: &[f32],
            in_dim: usize,
            rows: usize,
            a: &[u16],
            rank: usize,
            t: &mut [f32],
        ) -> usize {
            debug_assert!(x.len() >= rows * in_dim && a.len() >= rank * in_dim && t.len() >= rows * rank);
            let (ap, xp, tp) = (a.as_ptr(), x.as_ptr(), t.as_mut_ptr());
            // SAFETY: as above; `$widen` reads LANES bf16 values from `$p`.
            let load = |j: usize, k: usize| unsafe {
                let $p = ap.add(j * in_dim + k);
                $widen
            };
            // SAFETY: forwarded from the caller.
            unsafe { $any(load, xp, in_dim, rows, rank, tp) };
            in_dim / $lanes * $lanes
        }

        /// # Safety
        /// See [`x_a_t_kernels`].
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn $block<const R: usize, const J: usize>(
            a: &impl Fn(usize, usize) -> $v,
            j: usize,
            x: *const f32,
            in_dim: usize,
            rank: usize,
            t: *mut f32,
        ) {
            // SAFETY: forwarded from the caller.
            unsafe {
                let mut acc = [[$zero(); R]; J];
                for k in (0..in_dim / $lanes * $lanes).step_by($lanes) {
                    let av: [$v; J] = std::array::from_fn(|i| a(j + i, k));
                    for r in 0..R {
                        let xv = $loadx(x.add(r * in_dim + k));
                        for i in 0..J {
                            acc[i][r] = $fma(av[i], xv, acc[i][r]);
                        }
                    }
                }
                for (i, rows) in acc.iter().enumerate() {
                    for (r, &v) in rows.iter().enumerate() {
                        *t.add(r * rank + j + i) = $reduce(v);
                    }
                }
            }
        }

        /// # Safety
        /// See [`x_a_t_kernels`].
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn $rows<const R: usize>(
            a: impl Fn(usize, usize) -> $v,
            x: *const f32,
            in_dim: usize,
            rank: usize,
            t: *mut f32,
        ) {
            // SAFETY: forwarded from the caller.
            unsafe {
                let mut j = 0;
                while j + 2 <= rank {
                    $block::<R, 2>(&a, j, x, in_dim, rank, t);
                    j += 2;
                }
                if j < rank {
                    $block::<R, 1>(&a, j, x, in_dim, rank, t);
                }
            }
        }

        /// # Safety
        /// See [`x_a_t_kernels`], with `R = rows.min(4)`.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn $any(
            load: impl Fn(usize, usize) -> $v,
            x: *const f32,
            in_dim: usize,
            rows: usize,
            rank: usize,
            t: *mut f32,
        ) {
            // SAFETY: forwarded from the caller.
            unsafe {
                match rows {
                    1 => $rows::<1>(load, x, in_dim, rank, t),
                    2 => $rows::<2>(load, x, in_dim, rank, t),
                    3 => $rows::<3>(load, x, in_dim, rank, t),
                    _ => $rows::<4>(load, x, in_dim, rank, t),
                }
            }
        }
    };
}

x_a_t_kernels!(
    "avx512f,avx512bw",
    __m512,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_fmadd_ps,
    _mm512_reduce_add_ps,
    x_a_t_block,
    x_a_t_rows,
    x_a_t_any,
    x_a_t_f32_avx512,
    x_a_t_bf16_avx512,
    |p| _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)), 16))
);
x_a_t_kernels!(
    "avx2,fma",
    __m256,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_fmadd_ps,
    hsum256,
    x_a_t_block_avx2,
    x_a_t_rows_avx2,
    x_a_t_any_avx2,
    x_a_t_f32_avx2,
    x_a_t_bf16_avx2,
    |p| _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)), 16))
);

/// Most activation rows the scaled kernels take: above it, turning each block into its exact
/// weights once for all rows costs less than scaling every row's block sum.
pub const SCALED_ROWS: usize = 3;
/// Most activation rows the dispatcher hands the AVX-512 scaled kernels: three rows measured
/// 6% slower there than the exact-weight kernel, one and two rows 12% and 5% faster.
pub const SCALED_ROWS_AVX512: usize = 2;
/// Most blocks per weight row they take (the activations' block sums live on the stack).
pub const SCALED_BLOCKS: usize = 256;

/// The sum of each block of 32 activations, `sx[i · nb + b]`, for `N` rows, written into the
/// first `N · nb` elements of `buf` (which need not be initialized) and returned.
///
/// # Safety
/// AVX2; `x` holds `N` rows of `nb · 32` floats and `N · nb ≤ buf.len()`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn block_sums<const N: usize>(x: *const f32, nb: usize, buf: &mut [std::mem::MaybeUninit<f32>]) -> &[f32] {
    debug_assert!(N * nb <= buf.len());
    // SAFETY: forwarded from the caller; every element of the returned slice is written first,
    // and MaybeUninit<f32> has f32's layout.
    unsafe {
        for i in 0..N {
            for b in 0..nb {
                let xb = x.add((i * nb + b) * BLOCK);
                let v = _mm256_add_ps(
                    _mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb.add(8))),
                    _mm256_add_ps(_mm256_loadu_ps(xb.add(16)), _mm256_loadu_ps(xb.add(24))),
                );
                buf.get_unchecked_mut(i * nb + b).write(hsum256(v));
            }
        }
        std::slice::from_raw_parts(buf.as_ptr().cast::<f32>(), N * nb)
    }
}

/// `Σ a[k]·b[k]` over `len` floats.
///
/// # Safety
/// AVX2 and FMA; both pointers are valid for `len` floats.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_avx2(a: *const f32, b: *const f32, len: usize) -> f32 {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut v = _mm256_setzero_ps();
        let body = len / 8 * 8;
        for k in (0..body).step_by(8) {
            v = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(k)), _mm256_loadu_ps(b.add(k)), v);
        }
        (body..len).fold(hsum256(v), |s, k| (*a.add(k)).mul_add(*b.add(k), s))
    }
}

/// The scaled kernels for one instruction set, for decode steps of one to [`SCALED_ROWS`]
/// rows. `$row::<N>` takes one weight row against `N` activation rows as
/// `Σ_b d_b·(q_b·x_b) + Σ_b m_b·s_b`, where `q(r, b)` gives its block `b`'s integer codes as
/// `32 / LANES` vectors of floats and `s_b` is the block's activation sum: the same sum as
/// `Σ (q·d + m)·x`, rounded differently (like any change of summation order; activations are
/// never rounded), with about half the arithmetic per block, which is what one to three decode
/// rows are bound by. `$tile::<N>` runs it over rows `r0..r1` with the block sums computed
/// once; `$q4_1` and `$q8_0` pick `N` for their format.
/// Their safety contract: the CPU has `$feat`; `q`, `d` (and `m`) hold rows `r0..r1` of a
/// matrix with `nb ≤ SCALED_BLOCKS` blocks per row, `x` holds `n ≤ SCALED_ROWS` rows of
/// `nb · 32` floats, and `out` is valid for `out[i · ldy + r]` for every `i < n` and `r` in
/// `r0..r1`, which no other thread touches meanwhile.
macro_rules! scaled_kernels {
    ($feat:literal, $v:ty, $lanes:expr, $zero:path, $load:path, $mul:path, $fma:path, $set1:path, $add:path, $reduce:path,
     $q4_codes:ident, $q8_codes:ident, $row:ident, $tile:ident, $q4_1:ident, $q8_0:ident) => {
        /// Weight row `r` (block `b` from `q(r, b)`, its scale `d[r · nb + b]`) against `N`
        /// activation rows. Plain loops, no closures: a generic helper taking one (such as
        /// `array::from_fn`) is compiled without AVX-512 and so cannot inline it.
        ///
        /// # Safety
        /// See [`scaled_kernels`]; `sx` holds the block sums when `m` is given.
        #[target_feature(enable = $feat)]
        #[inline]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $row<const N: usize>(
            q: &impl Fn(usize, usize) -> [$v; BLOCK / $lanes],
            r: usize,
            d: *const f32,
            m: Option<*const f32>,
            nb: usize,
            x: *const f32,
            sx: &[f32],
            y: &mut [f32; N],
        ) {
            // SAFETY: forwarded from the caller.
            unsafe {
                // Two chains per row (even and odd blocks), so the scaling FMAs overlap.
                let mut sums = [[$zero(); 2]; N];
                let mut b = 0;
                while b < nb {
                    for c in 0..2 {
                        if b + c == nb {
                            break;
                        }
                        let w = q(r, b + c);
                        let db = $set1(*d.add(r * nb + b + c));
                        for (i, s) in sums.iter_mut().enumerate() {
                            let xb = x.add((i * nb + b + c) * BLOCK);
                            let mut t = $mul(w[0], $load(xb));
                            for (l, wl) in w.iter().enumerate().skip(1) {
                                t = $fma(*wl, $load(xb.add(l * $lanes)), t);
                            }
                            s[c] = $fma(db, t, s[c]);
                        }
                    }
                    b += 2;
                }
                for (i, (s, y)) in sums.iter().zip(y.iter_mut()).enumerate() {
                    *y = $reduce($add(s[0], s[1]));
                    if let Some(m) = m {
                        *y += dot_avx2(m.add(r * nb), sx.as_ptr().add(i * nb), nb);
                    }
                }
            }
        }

        /// # Safety
        /// See [`scaled_kernels`]; `q(r, b)` is valid for the tile's rows and blocks.
        #[target_feature(enable = $feat)]
        #[inline]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $tile<const N: usize>(
            q: impl Fn(usize, usize) -> [$v; BLOCK / $lanes],
            d: &[f32],
            m: Option<&[f32]>,
            nb: usize,
            r0: usize,
            r1: usize,
            x: &[f32],
            out: *mut f32,
            ldy: usize,
        ) {
            debug_assert!(nb <= SCALED_BLOCKS && x.len() >= N * nb * BLOCK);
            // SAFETY: forwarded from the caller.
            unsafe {
                // Not zeroed: only the block sums written for this tile are read (none without `m`).
                let mut buf = [std::mem::MaybeUninit::<f32>::uninit(); SCALED_ROWS * SCALED_BLOCKS];
                let sx: &[f32] = if m.is_some() { block_sums::<N>(x.as_ptr(), nb, &mut buf) } else { &[] };
                let (dp, mp) = (d.as_ptr(), m.map(|m| m.as_ptr()));
                for r in r0..r1 {
                    let mut ys = [0f32; N];
                    $row::<N>(&q, r, dp, mp, nb, x.as_ptr(), sx, &mut ys);
                    for (i, y) in ys.iter().enumerate() {
                        *out.add(i * ldy + r) = *y;
                    }
                }
            }
        }

        /// Q4_1 rows `r0..r1` against `n ≤ SCALED_ROWS` activation rows.
        ///
        /// # Safety
        /// See [`scaled_kernels`].
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $q4_1(
            q: &[u8],
            d: &[f32],
            m: &[f32],
            nb: usize,
            r0: usize,
            r1: usize,
            x: &[f32],
            n: usize,
            out: *mut f32,
            ldy: usize,
        ) {
            debug_assert!(q.len() >= r1 * nb * 16 && m.len() >= r1 * nb);
            let qp = q.as_ptr();
            // SAFETY: the caller passes whole rows: 16 bytes per block.
            let codes = |r: usize, b: usize| unsafe { $q4_codes(qp, r * nb + b) };
            // SAFETY: forwarded from the caller.
            unsafe {
                match n {
                    1 => $tile::<1>(codes, d, Some(m), nb, r0, r1, x, out, ldy),
                    2 => $tile::<2>(codes, d, Some(m), nb, r0, r1, x, out, ldy),
                    _ => $tile::<3>(codes, d, Some(m), nb, r0, r1, x, out, ldy),
                }
            }
        }

        /// Q8_0 rows `r0..r1` against `n ≤ SCALED_ROWS` activation rows (`Σ_b d_b·(q_b·x_b)`).
        ///
        /// # Safety
        /// See [`scaled_kernels`], with 32 codes per block.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $q8_0(
            q: &[i8],
            d: &[f32],
            nb: usize,
            r0: usize,
            r1: usize,
            x: &[f32],
            n: usize,
            out: *mut f32,
            ldy: usize,
        ) {
            debug_assert!(q.len() >= r1 * nb * BLOCK);
            let qp = q.as_ptr();
            // SAFETY: the caller passes whole rows: 32 codes per block.
            let codes = |r: usize, b: usize| unsafe { $q8_codes(qp, r * nb + b) };
            // SAFETY: forwarded from the caller.
            unsafe {
                match n {
                    1 => $tile::<1>(codes, d, None, nb, r0, r1, x, out, ldy),
                    2 => $tile::<2>(codes, d, None, nb, r0, r1, x, out, ldy),
                    _ => $tile::<3>(codes, d, None, nb, r0, r1, x, out, ldy),
                }
            }
        }
    };
}

scaled_kernels!(
    "avx2,fma",
    __m256,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_mul_ps,
    _mm256_fmadd_ps,
    _mm256_set1_ps,
    _mm256_add_ps,
    hsum256,
    q4_1_codes_avx2,
    q8_0_codes_avx2,
    row_scaled_avx2,
    tile_scaled_avx2,
    q4_1_tile_scaled_avx2,
    q8_0_tile_scaled_avx2
);
scaled_kernels!(
    "avx512f,avx512bw",
    __m512,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_mul_ps,
    _mm512_fmadd_ps,
    _mm512_set1_ps,
    _mm512_add_ps,
    _mm512_reduce_add_ps,
    q4_1_codes_avx512,
    q8_0_codes_avx512,
    row_scaled_avx512,
    tile_scaled_avx512,
    q4_1_tile_scaled_avx512,
    q8_0_tile_scaled_avx512
);

/// One whole LoRA panel added to `rows` output rows: `out[i·ldy + c] += Σ_j t[i·rank + j] ·
/// wide[j·8 + c]` for `c < 8`, with `wide` the panel widened to f32. Even and odd `j` go to
/// separate accumulators, odd ranks end on the even one, and the two are summed before the
/// addition: the order [`super::low_rank::add_term`]'s portable code keeps, so the sums are bit for
/// bit the same. Two rows at a time keep four FMA chains in flight; the accumulators stay in
/// registers (the portable code's arrays of accumulators went through the stack, and reading
/// them back in other widths stalled store forwarding: half of `add_low_rank`'s time on
/// sixteen streams).
///
/// # Safety
/// AVX2 and FMA must be available; `t` holds `rows · rank` floats, `wide` `rank · 8`, and
/// `out` is valid for 8 floats at each of `rows` rows of stride `ldy`, which no other thread
/// touches meanwhile.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn panel_rows_avx2(t: *const f32, rows: usize, rank: usize, wide: *const f32, out: *mut f32, ldy: usize) {
    // SAFETY (whole body): within the bounds the caller vouches for.
    unsafe {
        let row = |ti: *const f32| {
            let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut j = 0;
            while j + 2 <= rank {
                even = _mm256_fmadd_ps(_mm256_broadcast_ss(&*ti.add(j)), _mm256_loadu_ps(wide.add(j * 8)), even);
                odd = _mm256_fmadd_ps(_mm256_broadcast_ss(&*ti.add(j + 1)), _mm256_loadu_ps(wide.add(j * 8 + 8)), odd);
                j += 2;
            }
            if j < rank {
                even = _mm256_fmadd_ps(_mm256_broadcast_ss(&*ti.add(j)), _mm256_loadu_ps(wide.add(j * 8)), even);
            }
            _mm256_add_ps(even, odd)
        };
        let add = |i: usize, acc: __m256| {
            let dst = out.add(i * ldy);
            _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), acc));
        };
        let mut i = 0;
        while i + 2 <= rows {
            let (a, b) = (row(t.add(i * rank)), row(t.add((i + 1) * rank)));
            add(i, a);
            add(i + 1, b);
            i += 2;
        }
        if i < rows {
            add(i, row(t.add(i * rank)));
        }
    }
}

/// Attention scores of `R` query heads of width 64 (`q`, `R·64`, already scaled) against
/// `keys` cached positions, into `scores[r·keys + p]`. Key block `b` (positions `16b ..
/// 16b + 16`) starts at `k[b·stride]`, component `d`'s 16 values at `d·16`; blocks exist whole,
/// so the last, partial one is loaded whole and its extra lanes dropped.
///
/// Lane for lane these are the portable `score_block`'s operations in its order (whole blocks:
/// FMAs from +0.0; the partial block: rounded product, then add, from -0.0), so the scores
/// have the same bits; 16 lanes a register and four blocks a pass share each query broadcast.
///
/// # Safety
/// AVX-512F must be available.
///
/// # Panics
/// If `q`, `scores` or `k` are shorter than the shapes above need.
#[target_feature(enable = "avx512f")]
pub unsafe fn attention_scores_avx512<const R: usize>(
    k: &[f32],
    stride: usize,
    q: &[f32],
    keys: usize,
    scores: &mut [f32],
) {
    let blocks = keys.div_ceil(16);
    assert!(q.len() >= R * 64 && scores.len() >= R * keys, "query or score buffer too short");
    assert!(blocks == 0 || (blocks - 1) * stride + 64 * 16 <= k.len(), "key blocks out of range");
    let (kp, qp, sp) = (k.as_ptr(), q.as_ptr(), scores.as_mut_ptr());
    let whole = keys / 16;
    let mut b = 0;
    // SAFETY (all calls): the asserts above bound every block and score index they touch.
    unsafe {
        while b + 4 <= whole {
            score_blocks_avx512::<R, 4>(kp.add(b * stride), stride, qp, sp.add(b * 16), keys);
            b += 4;
        }
        while b < whole {
            score_blocks_avx512::<R, 1>(kp.add(b * stride), stride, qp, sp.add(b * 16), keys);
            b += 1;
        }
        if whole < blocks {
            let kb = kp.add(whole * stride);
            let mut acc = [_mm512_set1_ps(-0.0); R];
            for d in 0..64 {
                let kv = _mm512_loadu_ps(kb.add(d * 16));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(_mm512_set1_ps(*qp.add(r * 64 + d)), kv));
                }
            }
            let mask: __mmask16 = (1u16 << (keys - whole * 16)) - 1;
            for (r, a) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(sp.add(r * keys + whole * 16), mask, *a);
            }
        }
    }
}

/// `B` whole key blocks (the first at `kb`, the next `stride` floats on) for `R` heads, summed
/// with FMAs in registers and stored at `s[r·keys ..]`.
///
/// # Safety
/// AVX-512F; the blocks and the `R` rows of `16·B` scores exist.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn score_blocks_avx512<const R: usize, const B: usize>(
    kb: *const f32,
    stride: usize,
    q: *const f32,
    s: *mut f32,
    keys: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); B]; R];
        for d in 0..64 {
            let mut kv = [_mm512_setzero_ps(); B];
            for (j, v) in kv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(kb.add(j * stride + d * 16));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let qd = _mm512_set1_ps(*q.add(r * 64 + d));
                for (a, v) in row.iter_mut().zip(&kv) {
                    *a = _mm512_fmadd_ps(qd, *v, *a);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate() {
                _mm512_storeu_ps(s.add(r * keys + j * 16), *a);
            }
        }
    }
}

/// The weighted sum of `keys` value vectors of width 64 for `R` heads: `dst[r·64 + c] =
/// Σ_p w[r·keys + p] · v[p·stride + c]`, FMAs from +0.0 in position order, as the portable
/// loop does lane for lane (same bits), with all 64 components of the `R` heads in registers
/// so each position's values are read once.
///
/// # Safety
/// AVX-512F must be available.
///
/// # Panics
/// If `w`, `dst` or `v` are shorter than the shapes above need.
#[target_feature(enable = "avx512f")]
pub unsafe fn attention_values_avx512<const R: usize>(
    v: &[f32],
    stride: usize,
    w: &[f32],
    keys: usize,
    dst: &mut [f32],
) {
    assert!(w.len() >= R * keys && dst.len() >= R * 64, "weight or output buffer too short");
    assert!(keys == 0 || (keys - 1) * stride + 64 <= v.len(), "values out of range");
    // SAFETY (whole body): the asserts above bound every index.
    unsafe {
        let (vp, wp) = (v.as_ptr(), w.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for p in 0..keys {
            let at = vp.add(p * stride);
            let vv = [
                _mm512_loadu_ps(at),
                _mm512_loadu_ps(at.add(16)),
                _mm512_loadu_ps(at.add(32)),
                _mm512_loadu_ps(at.add(48)),
            ];
            for (r, row) in acc.iter_mut().enumerate() {
                let wr = _mm512_set1_ps(*wp.add(r * keys + p));
                for (a, x) in row.iter_mut().zip(&vv) {
                    *a = _mm512_fmadd_ps(wr, *x, *a);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                _mm512_storeu_ps(dst.as_mut_ptr().add(r * 64 + c * 16), *a);
            }
        }
    }
}
