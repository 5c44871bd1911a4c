//! Opt-in 8-bit activations: each block of 32 activations rounded to `d·q` with `q` in
//! −127..=127 (llama.cpp's Q8_1, which also keeps `s = d·Σq`), and integer dot products
//! against the packed weights' codes.
//!
//! Not exact: the rounding moves SmolLM2-135M's logits by a few tenths and can change greedy
//! answers, which is why [`Activations::F32`] is the default. What it buys is arithmetic: with
//! AVX2, one `vpmaddubsw` and one `vpmaddwd` multiply and sum 32 code pairs, where the f32
//! kernels need four FMAs plus decoding the block (on Zen 3 all of these share the same two
//! ports, so that count is what matters). Batched decoding on machines without AVX-512 is
//! bound by exactly that arithmetic.

use super::{BLOCK, FUSED_ROWS};

/// What the fused (decode) kernels multiply the packed weights against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    /// f32 activations against exactly dequantized weights: a dense matmul up to the order of
    /// the additions.
    #[default]
    F32,
    /// Activations rounded to 8 bits per block of 32, integer dot products (llama.cpp's
    /// arithmetic). Faster batches on AVX2; not exact.
    Q8,
}

impl std::str::FromStr for Activations {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "q8" => Ok(Self::Q8),
            other => Err(format!("unknown activation precision {other:?}; expected f32 or q8")),
        }
    }
}

/// `n` activation rows of `nb` blocks, rounded: row `i`, block `b` is `d[i·nb + b] · q[..]`,
/// with `s[i·nb + b] = d · Σq`.
#[derive(Debug, Default)]
pub(super) struct Q8Rows {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    /// The scales again, laid out for the AVX2 kernel: per group of eight rows and block, 16
    /// floats, rows 0 to 3 twice then rows 4 to 7 twice (zero past the last row), so one
    /// multiply by the weight block's scale serves four rows and an in-lane shuffle picks
    /// each row's product.
    pub dt: Vec<f32>,
}

/// Where `dt` keeps row `i`'s scale of block `b` (and, 4 floats on, its copy).
pub(super) fn dt_at(i: usize, b: usize, nb: usize) -> usize {
    ((i / 8) * nb + b) * 16 + if i % 8 < 4 { i % 8 } else { 8 + i % 8 - 4 }
}

impl Q8Rows {
    /// Rounds the first `n` rows of `x` (`nb · 32` floats each) into `self`, reusing its
    /// buffers.
    pub fn quantize(&mut self, x: &[f32], n: usize, nb: usize) {
        let blocks = n * nb;
        assert!(x.len() >= blocks * BLOCK, "activations shorter than n rows");
        self.q.resize(blocks * BLOCK, 0);
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0.0);
        let simd = cfg!(target_arch = "x86_64") && matches!(super::isa(), super::Isa::Avx2 | super::Isa::Avx512);
        if simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 was detected; every slice holds `blocks` blocks (resized above).
            unsafe {
                avx2::quantize(&x[..blocks * BLOCK], &mut self.q, &mut self.d, &mut self.s)
            };
        } else {
            for b in 0..blocks {
                let (d, s) = quantize_block(&x[b * BLOCK..(b + 1) * BLOCK], &mut self.q[b * BLOCK..(b + 1) * BLOCK]);
                self.d[b] = d;
                self.s[b] = s;
            }
        }
        self.dt.clear();
        self.dt.resize(n.div_ceil(8) * nb * 16, 0.0);
        for i in 0..n {
            for b in 0..nb {
                let at = dt_at(i, b, nb);
                self.dt[at] = self.d[i * nb + b];
                self.dt[at + 4] = self.d[i * nb + b];
            }
        }
    }
}

/// One block: `d = max|x| / 127`, `q = round(x / d)` (ties to even), returns `(d, d·Σq)`.
/// The AVX2 quantizer does the same operations in the same order, so both give equal bits.
pub(super) fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round_ties_even() as i32;
        sum += r;
        *o = r as i8;
    }
    (d, d * sum as f32)
}

/// Weight rows `r0..r1` of `w` against the `n` rows of `x` into `out[i·ldy + r]`: the AVX2
/// kernel where the CPU has it, else the portable one, in groups of eight rows.
///
/// # Safety
/// Rows `r0..r1` exist in `w`, `x` holds `n` rows, and `out` is valid for `out[i·ldy + r]`,
/// `i < n`, `r` in `r0..r1`, which no other thread touches meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    w: Codes<'_>,
    nb: usize,
    r0: usize,
    r1: usize,
    x: &Q8Rows,
    n: usize,
    out: *mut f32,
    ldy: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if matches!(super::isa(), super::Isa::Avx2 | super::Isa::Avx512) {
        // SAFETY: AVX2 was detected; the rest is forwarded from the caller.
        return unsafe { avx2::tile(w, nb, r0, r1, x, n, out, ldy) };
    }
    let mut acc = [0f32; FUSED_ROWS];
    for g0 in (0..n).step_by(FUSED_ROWS) {
        let gn = FUSED_ROWS.min(n - g0);
        for r in r0..r1 {
            row_portable(w, r, nb, x, g0, gn, &mut acc);
            for (i, a) in acc.iter().enumerate().take(gn) {
                // SAFETY: the caller guarantees this element is ours.
                unsafe { *out.add((g0 + i) * ldy + r) = *a };
            }
        }
    }
}

/// The portable kernel: `acc[i] = Σ_b dw·dx·Σ qw·qx (+ m·s for Q4_1)` for `n ≤ 8` rows of
/// `xq` against weight row `r`.
#[allow(clippy::too_many_arguments)]
pub(super) fn row_portable(w: Codes<'_>, r: usize, nb: usize, xq: &Q8Rows, g0: usize, n: usize, acc: &mut [f32]) {
    for (i, a) in acc.iter_mut().enumerate().take(n) {
        let row = g0 + i;
        let mut total = 0f32;
        for b in 0..nb {
            let (wb, xb) = (r * nb + b, row * nb + b);
            let xs = &xq.q[xb * BLOCK..(xb + 1) * BLOCK];
            let (dot, dw, extra) = match w {
                Codes::Q4_1 { q, d, m } => {
                    let qb = &q[wb * 16..wb * 16 + 16];
                    let dot: i32 = (0..16)
                        .map(|j| (qb[j] & 0x0F) as i32 * xs[j] as i32 + (qb[j] >> 4) as i32 * xs[j + 16] as i32)
                        .sum();
                    (dot, d[wb], m[wb] * xq.s[xb])
                }
                Codes::Q8_0 { q, d } => {
                    let dot: i32 =
                        q[wb * BLOCK..(wb + 1) * BLOCK].iter().zip(xs).map(|(&a, &b)| a as i32 * b as i32).sum();
                    (dot, d[wb], 0.0)
                }
            };
            total += dw * xq.d[xb] * dot as f32 + extra;
        }
        *a = total;
    }
}

/// A packed matrix's codes, as the 8-bit kernels read them.
#[derive(Clone, Copy)]
pub(super) enum Codes<'a> {
    Q4_1 { q: &'a [u8], d: &'a [f32], m: &'a [f32] },
    Q8_0 { q: &'a [i8], d: &'a [f32] },
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    //! The AVX2 quantizer and integer dot-product kernels.

    use std::arch::x86_64::*;

    use super::super::x86::{avx2_chains, hsum256};
    use super::super::{BLOCK, FUSED_ROWS};
    use super::{dt_at, Codes, Q8Rows};

    /// [`super::quantize_block`] for every block of `x`.
    ///
    /// # Safety
    /// AVX2; `q` holds `x.len()` values, `d` and `s` `x.len() / 32`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
        debug_assert!(q.len() >= x.len() && d.len() * BLOCK >= x.len() && s.len() * BLOCK >= x.len());
        // SAFETY: every access is inside block b of the slices, as the caller guarantees.
        unsafe {
            let sign = _mm256_set1_ps(-0.0);
            // packs interleave 128-bit lanes; this puts the 32 bytes back in element order.
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for b in 0..x.len() / BLOCK {
                let xp = x.as_ptr().add(b * BLOCK);
                let v = [
                    _mm256_loadu_ps(xp),
                    _mm256_loadu_ps(xp.add(8)),
                    _mm256_loadu_ps(xp.add(16)),
                    _mm256_loadu_ps(xp.add(24)),
                ];
                let mut amax = _mm256_andnot_ps(sign, v[0]);
                for w in &v[1..] {
                    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, *w));
                }
                let amax = hmax(amax);
                let db = amax / 127.0;
                let id = _mm256_set1_ps(if db != 0.0 { 1.0 / db } else { 0.0 });
                // (No `array::map` here: std's generic helpers are compiled without AVX2.)
                let r = [round(v[0], id), round(v[1], id), round(v[2], id), round(v[3], id)];
                let total = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
                let lo = _mm256_packs_epi32(r[0], r[1]);
                let hi = _mm256_packs_epi32(r[2], r[3]);
                let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), order);
                _mm256_storeu_si256(q.as_mut_ptr().add(b * BLOCK) as *mut __m256i, bytes);
                *d.get_unchecked_mut(b) = db;
                *s.get_unchecked_mut(b) = db * hsum_epi32(total) as f32;
            }
        }
    }

    /// `v · id` rounded to the nearest integer, ties to even.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn round(v: __m256, id: __m256) -> __m256i {
        _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
        _mm_cvtss_f32(m)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum_epi32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
        _mm_cvtsi128_si32(s)
    }

    /// Lane `k` of each 128-bit half of `v`, everywhere.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn row_scale(v: __m256, k: usize) -> __m256 {
        match k {
            0 => _mm256_shuffle_ps(v, v, 0x00),
            1 => _mm256_shuffle_ps(v, v, 0x55),
            2 => _mm256_shuffle_ps(v, v, 0xAA),
            _ => _mm256_shuffle_ps(v, v, 0xFF),
        }
    }

    /// Weight row `r` (blocks `r·nb..`) against activation rows `g0..g0 + N`: per block, the
    /// codes are loaded once and each row takes one `vpmaddubsw` (unsigned codes times signed
    /// activations; Q8_0 codes are made unsigned by moving their sign onto the activations),
    /// one `vpmaddwd` to 32-bit sums, and one FMA with `dw·dx`. Q4_1's `m·Σx` is a dot of the
    /// row's minimums with the activations' block sums at the end.
    ///
    /// # Safety
    /// AVX2; `r` and rows `g0..g0 + N` exist in `w` and `x`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn row<const N: usize, const Q4: bool>(
        w: Codes<'_>,
        r: usize,
        nb: usize,
        x: &Q8Rows,
        g0: usize,
        acc: &mut [f32; FUSED_ROWS],
    ) {
        // As many independent chains per row as the f32 kernels keep.
        let ch = const { avx2_chains(N) };
        let (qp, dp, mp): (*const u8, *const f32, *const f32) = match w {
            Codes::Q4_1 { q, d, m } => (q.as_ptr(), d.as_ptr(), m.as_ptr()),
            Codes::Q8_0 { q, d } => (q.as_ptr().cast(), d.as_ptr(), std::ptr::null()),
        };
        let cols = nb * BLOCK;
        // SAFETY: every pointer below stays inside weight row r and activation rows
        // g0..g0 + N, as the caller guarantees.
        unsafe {
            let qp = qp.add(r * nb * if Q4 { 16 } else { BLOCK });
            let dp = dp.add(r * nb);
            debug_assert!(g0.is_multiple_of(8), "groups start at multiples of eight rows");
            let xq = x.q.as_ptr().add(g0 * cols);
            let xd = x.dt.as_ptr().add(dt_at(g0, 0, nb));
            let mut sums = [[_mm256_setzero_ps(); 4]; N];
            let full = nb / ch * ch;
            let mut b0 = 0;
            while b0 < full {
                for c in 0..ch {
                    block::<N, Q4>(qp, dp, b0 + c, xq, xd, nb, c, &mut sums);
                }
                b0 += ch;
            }
            for b in full..nb {
                block::<N, Q4>(qp, dp, b, xq, xd, nb, 0, &mut sums);
            }
            for (i, s) in sums.iter().enumerate() {
                let mut total = s[0];
                for v in &s[1..ch] {
                    total = _mm256_add_ps(total, *v);
                }
                let mut tail = 0f32;
                if Q4 {
                    let (m, xs) = (mp.add(r * nb), x.s.as_ptr().add((g0 + i) * nb));
                    let whole = nb / 8 * 8;
                    for b in (0..whole).step_by(8) {
                        total = _mm256_fmadd_ps(_mm256_loadu_ps(m.add(b)), _mm256_loadu_ps(xs.add(b)), total);
                    }
                    for b in whole..nb {
                        tail = (*m.add(b)).mul_add(*xs.add(b), tail);
                    }
                }
                acc[i] = hsum256(total) + tail;
            }
        }
    }

    /// Block `b` of one weight row (codes behind `qp`, scales behind `dp`) against `N`
    /// activation rows, into each row's chain `c`.
    ///
    /// # Safety
    /// AVX2; block `b` exists behind `qp` and `dp`, and in each of the `N` rows behind `xq`
    /// (`nb` blocks a row) and `xd`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const N: usize, const Q4: bool>(
        qp: *const u8,
        dp: *const f32,
        b: usize,
        xq: *const i8,
        xd: *const f32,
        nb: usize,
        c: usize,
        sums: &mut [[__m256; 4]; N],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let dw = _mm256_set1_ps(*dp.add(b));
            // dw·dx for rows 0 to 3 (twice), and for rows 4 to 7.
            let lo = _mm256_mul_ps(dw, _mm256_loadu_ps(xd.add(b * 16)));
            let hi = if N > 4 { _mm256_mul_ps(dw, _mm256_loadu_ps(xd.add(b * 16 + 8))) } else { lo };
            let w = if Q4 {
                let raw = _mm_loadu_si128(qp.add(b * 16) as *const __m128i);
                _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F))
            } else {
                _mm256_loadu_si256(qp.add(b * BLOCK) as *const __m256i)
            };
            let uw = if Q4 { w } else { _mm256_sign_epi8(w, w) };
            for (i, s) in sums.iter_mut().enumerate() {
                let mut xv = _mm256_loadu_si256(xq.add((i * nb + b) * BLOCK) as *const __m256i);
                if !Q4 {
                    xv = _mm256_sign_epi8(xv, w);
                }
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(uw, xv), _mm256_set1_epi16(1));
                let scale = row_scale(if i < 4 { lo } else { hi }, i % 4);
                s[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, s[c]);
            }
        }
    }

    /// Weight rows `r0..r1` against every row of `x`, eight at a time, into
    /// `out[i·ldy + r]`; groups outside, weight rows inside, as in the f32 tiles.
    ///
    /// # Safety
    /// AVX2; rows `r0..r1` exist in `w`, `x` holds `n` rows, and `out` is valid for
    /// `out[i·ldy + r]`, `i < n`, `r` in `r0..r1`, which no other thread touches meanwhile.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(w: Codes<'_>, nb: usize, r0: usize, r1: usize, x: &Q8Rows, n: usize, out: *mut f32, ldy: usize) {
        let mut g0 = 0;
        while g0 < n {
            let gn = (n - g0).min(FUSED_ROWS);
            for r in r0..r1 {
                let mut acc = [0f32; FUSED_ROWS];
                // SAFETY: forwarded from the caller.
                unsafe {
                    match w {
                        Codes::Q4_1 { .. } => rows::<true>(w, r, nb, x, g0, gn, &mut acc),
                        Codes::Q8_0 { .. } => rows::<false>(w, r, nb, x, g0, gn, &mut acc),
                    }
                    for (i, a) in acc.iter().enumerate().take(gn) {
                        *out.add((g0 + i) * ldy + r) = *a;
                    }
                }
            }
            g0 += gn;
        }
    }

    /// [`row`] for `n` (1 to 8) rows.
    ///
    /// # Safety
    /// As for [`row`].
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn rows<const Q4: bool>(
        w: Codes<'_>,
        r: usize,
        nb: usize,
        x: &Q8Rows,
        g0: usize,
        n: usize,
        acc: &mut [f32; FUSED_ROWS],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match n {
                1 => row::<1, Q4>(w, r, nb, x, g0, acc),
                2 => row::<2, Q4>(w, r, nb, x, g0, acc),
                3 => row::<3, Q4>(w, r, nb, x, g0, acc),
                4 => row::<4, Q4>(w, r, nb, x, g0, acc),
                5 => row::<5, Q4>(w, r, nb, x, g0, acc),
                6 => row::<6, Q4>(w, r, nb, x, g0, acc),
                7 => row::<7, Q4>(w, r, nb, x, g0, acc),
                _ => row::<8, Q4>(w, r, nb, x, g0, acc),
            }
        }
    }
}
