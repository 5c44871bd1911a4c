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

mod q8;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use q8::Activations;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use half::f16;
use rayon::prelude::*;

use crate::lora::{Served, PANEL};

/// Elements per GGML block for the packed formats here.
pub const BLOCK: usize = 32;

/// Most activation rows one fused kernel call takes (AVX-512 and AVX2; portable takes 4).
const FUSED_ROWS: usize = 8;

/// Up to this many activation rows (a decode batch), the fused dequantize-and-dot kernels run,
/// in groups, over each weight row while it is in L1; above it (prompts) a tile of weights is
/// dequantized once and handed to a cache-blocked f32 GEMM.
const FUSED_MAX: usize = 32;

/// From this many activation rows on, AVX-512 kernels take two weight rows per pass.
const PAIR_ROWS: usize = 4;

/// Rows per fused kernel call on this machine.
fn fused_group() -> usize {
    match isa() {
        Isa::Avx512 | Isa::Avx2 => FUSED_ROWS,
        Isa::Portable => 4,
    }
}

/// Output rows per GEMM tile (its dequantized weights are at most `TILE × cols` floats).
const GEMM_TILE: usize = 64;

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

impl QMatrix {
    /// A dense matrix from row-major data.
    pub fn dense(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "dense matrix data does not match its shape");
        Self { rows, cols, packed: Packed::F32(data), activations: Activations::F32 }
    }

    /// Keeps Q4_1 and Q8_0 packed; any other GGML type is dequantized to f32.
    pub fn from_qtensor(qt: &QTensor) -> candle_core::Result<Self> {
        let (rows, cols) = qt.shape().dims2()?;
        let packable = cols % BLOCK == 0;
        match qt.dtype() {
            GgmlDType::Q4_1 if packable => Ok(Self::from_q4_1_bytes(&qt.data()?, rows, cols)),
            GgmlDType::Q8_0 if packable => Ok(Self::from_q8_0_bytes(&qt.data()?, rows, cols)),
            _ => {
                let t = qt.dequantize(&Device::Cpu)?;
                Ok(Self::dense(t.flatten_all()?.to_vec1::<f32>()?, rows, cols))
            }
        }
    }

    /// Repacks GGML Q4_1 blocks (`f16 d, f16 m, [u8; 16]`, 20 bytes each).
    pub fn from_q4_1_bytes(bytes: &[u8], rows: usize, cols: usize) -> Self {
        let blocks = rows * cols / BLOCK;
        assert_eq!(bytes.len(), blocks * 20, "Q4_1 data does not match its shape");
        let mut d = Vec::with_capacity(blocks);
        let mut m = Vec::with_capacity(blocks);
        let mut qs = Vec::with_capacity(blocks * 16);
        for b in bytes.chunks_exact(20) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            m.push(f16::from_le_bytes([b[2], b[3]]).to_f32());
            qs.extend_from_slice(&b[4..20]);
        }
        Self { rows, cols, packed: Packed::Q4_1 { d, m, qs }, activations: Activations::F32 }
    }

    /// Repacks GGML Q8_0 blocks (`f16 d, [i8; 32]`, 34 bytes each).
    pub fn from_q8_0_bytes(bytes: &[u8], rows: usize, cols: usize) -> Self {
        let blocks = rows * cols / BLOCK;
        assert_eq!(bytes.len(), blocks * 34, "Q8_0 data does not match its shape");
        let mut d = Vec::with_capacity(blocks);
        let mut qs = Vec::with_capacity(blocks * BLOCK);
        for b in bytes.chunks_exact(34) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            qs.extend(b[2..34].iter().map(|&v| v as i8));
        }
        Self { rows, cols, packed: Packed::Q8_0 { d, qs }, activations: Activations::F32 }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Chooses what decode steps (up to 32 rows) multiply this matrix's packed weights
    /// against; dense matrices and prompts always take f32.
    pub fn set_activations(&mut self, activations: Activations) {
        self.activations = activations;
    }

    /// The matrix's codes for the 8-bit kernels, when it is packed and set to take them.
    fn q8_codes(&self) -> Option<q8::Codes<'_>> {
        match (&self.packed, self.activations) {
            (Packed::Q4_1 { d, m, qs }, Activations::Q8) => Some(q8::Codes::Q4_1 { q: qs, d, m }),
            (Packed::Q8_0 { d, qs }, Activations::Q8) => Some(q8::Codes::Q8_0 { q: qs, d }),
            _ => None,
        }
    }

    /// `x` rounded to 8 bits, in the calling thread's reused buffer, when the fused kernels
    /// take 8-bit activations; hand it back with [`Self::give_back`].
    fn rounded(&self, x: &[f32], n: usize) -> Option<q8::Q8Rows> {
        self.q8_codes()?;
        let mut rows = Q8_SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        rows.quantize(x, n, self.cols / BLOCK);
        Some(rows)
    }

    fn give_back(rows: Option<q8::Q8Rows>) {
        if let Some(rows) = rows {
            Q8_SCRATCH.with(|s| *s.borrow_mut() = rows);
        }
    }

    /// A fused tile with `x` or, when given, its 8-bit rounding.
    ///
    /// # Safety
    /// As for [`Self::fused_tile`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn decode_tile(
        &self,
        x: &[f32],
        xq: Option<&q8::Q8Rows>,
        n: usize,
        r0: usize,
        r1: usize,
        out: OutPtr,
        ldy: usize,
    ) {
        match (xq, self.q8_codes()) {
            // SAFETY: forwarded from the caller.
            (Some(xq), Some(codes)) => unsafe { q8::tile(codes, self.cols / BLOCK, r0, r1, xq, n, out.0, ldy) },
            // SAFETY: forwarded from the caller.
            _ => unsafe { self.fused_tile(x, n, r0, r1, out, ldy) },
        }
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weight data held.
    pub fn bytes(&self) -> usize {
        match &self.packed {
            Packed::Q4_1 { d, m, qs } => (d.len() + m.len()) * 4 + qs.len(),
            Packed::Q8_0 { d, qs } => d.len() * 4 + qs.len(),
            Packed::F32(v) => v.len() * 4,
        }
    }

    /// The matrix's rows one after another (`self` first), when both are stored alike;
    /// otherwise both are made dense first. Used to fuse q/k/v and gate/up into one matmul.
    pub fn concat_rows(parts: &[&QMatrix]) -> QMatrix {
        let cols = parts[0].cols;
        assert!(parts.iter().all(|p| p.cols == cols), "fused matrices need the same input width");
        let rows = parts.iter().map(|p| p.rows).sum();
        let kind = |p: &QMatrix| std::mem::discriminant(&p.packed);
        if parts.iter().all(|p| kind(p) == kind(parts[0])) {
            let packed = match &parts[0].packed {
                Packed::Q4_1 { .. } => {
                    let (mut d, mut m, mut qs) = (Vec::new(), Vec::new(), Vec::new());
                    for p in parts {
                        if let Packed::Q4_1 { d: pd, m: pm, qs: pq } = &p.packed {
                            d.extend_from_slice(pd);
                            m.extend_from_slice(pm);
                            qs.extend_from_slice(pq);
                        }
                    }
                    Packed::Q4_1 { d, m, qs }
                }
                Packed::Q8_0 { .. } => {
                    let (mut d, mut qs) = (Vec::new(), Vec::new());
                    for p in parts {
                        if let Packed::Q8_0 { d: pd, qs: pq } = &p.packed {
                            d.extend_from_slice(pd);
                            qs.extend_from_slice(pq);
                        }
                    }
                    Packed::Q8_0 { d, qs }
                }
                Packed::F32(_) => {
                    let mut v = Vec::with_capacity(rows * cols);
                    for p in parts {
                        if let Packed::F32(pv) = &p.packed {
                            v.extend_from_slice(pv);
                        }
                    }
                    Packed::F32(v)
                }
            };
            return QMatrix { rows, cols, packed, activations: parts[0].activations };
        }
        let mut v = Vec::with_capacity(rows * cols);
        for p in parts {
            v.extend_from_slice(&p.to_dense());
        }
        QMatrix::dense(v, rows, cols)
    }

    /// Every element as f32, row-major.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.rows_into(0, self.rows, &mut out);
        out
    }

    /// Dequantizes row `r` into `out` (`cols` floats): the embedding lookup.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        self.rows_into(r, r + 1, out);
    }

    /// Dequantizes rows `r0..r1` into `out`, row-major. The arithmetic is the same as
    /// candle's `dequantize`, so these values equal the dense weights bit for bit.
    fn rows_into(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let cols = self.cols;
        let out = &mut out[..(r1 - r0) * cols];
        match &self.packed {
            Packed::F32(v) => out.copy_from_slice(&v[r0 * cols..r1 * cols]),
            Packed::Q4_1 { d, m, qs } => {
                let b0 = r0 * cols / BLOCK;
                let b1 = r1 * cols / BLOCK;
                #[cfg(target_arch = "x86_64")]
                match isa() {
                    // SAFETY: the ISA was detected; the slices cover blocks b0..b1 and `out`.
                    Isa::Avx512 => {
                        return unsafe { x86::dequant_q4_1_avx512(&qs[b0 * 16..b1 * 16], &d[b0..b1], &m[b0..b1], out) }
                    }
                    // SAFETY: as above.
                    Isa::Avx2 => {
                        return unsafe { x86::dequant_q4_1_avx2(&qs[b0 * 16..b1 * 16], &d[b0..b1], &m[b0..b1], out) }
                    }
                    Isa::Portable => {}
                }
                for (i, dst) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let b = b0 + i;
                    let (db, mb) = (d[b], m[b]);
                    let q = &qs[b * 16..b * 16 + 16];
                    for j in 0..16 {
                        dst[j] = (q[j] & 0x0F) as f32 * db + mb;
                        dst[j + 16] = (q[j] >> 4) as f32 * db + mb;
                    }
                }
            }
            Packed::Q8_0 { d, qs } => {
                let b0 = r0 * cols / BLOCK;
                let b1 = r1 * cols / BLOCK;
                #[cfg(target_arch = "x86_64")]
                match isa() {
                    // SAFETY: as above.
                    Isa::Avx512 => {
                        return unsafe { x86::dequant_q8_0_avx512(&qs[b0 * BLOCK..b1 * BLOCK], &d[b0..b1], out) }
                    }
                    // SAFETY: as above.
                    Isa::Avx2 => {
                        return unsafe { x86::dequant_q8_0_avx2(&qs[b0 * BLOCK..b1 * BLOCK], &d[b0..b1], out) }
                    }
                    Isa::Portable => {}
                }
                for (i, dst) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let b = b0 + i;
                    let db = d[b];
                    for (o, &q) in dst.iter_mut().zip(&qs[b * BLOCK..(b + 1) * BLOCK]) {
                        *o = q as f32 * db;
                    }
                }
            }
        }
    }

    /// `y[i, ..rows] = x[i, ..] · Wᵀ` for `n` activation rows; `x` is `[n, cols]` and row `i`
    /// of `y` starts at `i * ldy`. Output rows are split across the current rayon pool.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32], ldy: usize) {
        self.matmul_plus(x, n, y, ldy, &[]);
    }

    /// [`Self::matmul`], then each [`LowRank`] term added to its rows and columns by the same
    /// task that wrote them (so a LoRA delta's `B` half runs in parallel with no extra pass).
    pub fn matmul_plus(&self, x: &[f32], n: usize, y: &mut [f32], ldy: usize, extra: &[LowRank<'_>]) {
        assert!(x.len() >= n * self.cols, "matmul input is shorter than n rows");
        check_terms(extra, n, self.rows);
        assert!(ldy >= self.rows && (n == 0 || y.len() >= (n - 1) * ldy + self.rows), "matmul output too short");
        if n == 0 {
            return;
        }
        let out = OutPtr(y.as_mut_ptr());
        if n <= FUSED_MAX {
            let tile = fused_tile(self.rows, n);
            let xq = self.rounded(x, n);
            claimed_tiles(
                self.rows.div_ceil(tile),
                || {},
                |t| {
                    let (r0, r1) = (t * tile, ((t + 1) * tile).min(self.rows));
                    prefetch_low_rank(extra, r0, r1);
                    // SAFETY: tiles cover disjoint column ranges of `y`, inside the bounds checked above.
                    unsafe {
                        self.decode_tile(x, xq.as_ref(), n, r0, r1, out, ldy);
                        add_low_rank(extra, r0, r1, out, ldy);
                    }
                },
            );
            Self::give_back(xq);
        } else {
            (0..self.rows.div_ceil(GEMM_TILE)).into_par_iter().for_each(|t| {
                let (r0, r1) = (t * GEMM_TILE, ((t + 1) * GEMM_TILE).min(self.rows));
                // SAFETY: as above.
                unsafe {
                    self.gemm_tile(x, n, r0, r1, out, ldy);
                    add_low_rank(extra, r0, r1, out, ldy);
                }
            });
        }
    }

    /// [`Self::matmul_plus`] for terms whose `t` is still to be computed: the calling thread
    /// runs `prepare` (which works out `x·Aᵀ`) and then the terms' whole contribution, `t·Bᵀ`,
    /// into `delta`, while the other threads start claiming tiles ([`claimed_tiles`]); it then
    /// claims what is left, and adds `delta` to `y` after the region. So the tiles run the base
    /// kernel alone, and the LoRA work is one pass over A and one over B on one thread rather
    /// than a piece of B per tile (for a decode step of a few rows, each piece was too small
    /// to pay for itself). Batches too large for the fused kernels go through
    /// [`Self::matmul_plus`] with the terms computed first. Terms must not overlap (they never
    /// do: each is one module's columns for one run of sequences' rows); the sums are then
    /// bit for bit those of `matmul_plus`.
    pub fn matmul_plus_prepared<'t, F>(
        &self,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        ldy: usize,
        delta: &mut Vec<f32>,
        prepare: F,
    ) where
        F: FnOnce() -> Vec<LowRank<'t>> + Send,
    {
        if n > FUSED_MAX || n == 0 {
            let terms = prepare();
            return self.matmul_plus(x, n, y, ldy, &terms);
        }
        assert!(x.len() >= n * self.cols, "matmul input is shorter than n rows");
        assert!(ldy >= self.rows && y.len() >= (n - 1) * ldy + self.rows, "matmul output too short");
        let out = OutPtr(y.as_mut_ptr());
        let tile = fused_tile(self.rows, n);
        let tiles = self.rows.div_ceil(tile);
        let xq = self.rounded(x, n);
        // The calling thread works out the terms and their delta while the others start on the
        // tiles; it then claims whatever tiles are left.
        let terms = claimed_tiles(
            tiles,
            || {
                let terms = prepare();
                check_terms(&terms, n, self.rows);
                let cover = terms.iter().map(|e| (e.row0 + e.rows) * ldy).max().unwrap_or(0);
                delta.clear();
                delta.resize(cover, 0.0);
                // SAFETY: the terms lie inside an [n, rows] output (checked), and `delta` holds
                // every row they touch at stride `ldy`; this task alone owns it.
                unsafe { add_low_rank(&terms, 0, self.rows, OutPtr(delta.as_mut_ptr()), ldy) };
                terms
            },
            |i| {
                let (r0, r1) = (i * tile, ((i + 1) * tile).min(self.rows));
                // SAFETY: tiles cover disjoint column ranges of `y`, inside the bounds checked above.
                unsafe { self.decode_tile(x, xq.as_ref(), n, r0, r1, out, ldy) };
            },
        );
        Self::give_back(xq);
        for e in &terms {
            for row in e.row0..e.row0 + e.rows {
                let at = row * ldy + e.col0..row * ldy + e.col0 + e.cols;
                for (d, v) in y[at.clone()].iter_mut().zip(&delta[at]) {
                    *d += v;
                }
            }
        }
    }

    /// # Safety
    /// `out` must be valid for rows `0..n` of stride `ldy` and columns `r0..r1`, and no other
    /// thread may write those elements meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn fused_tile(&self, x: &[f32], n: usize, r0: usize, r1: usize, out: OutPtr, ldy: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let nb = self.cols / BLOCK;
            // SAFETY: the ISA was detected; the slices are whole rows of this matrix and the
            // caller vouches for `out`.
            unsafe {
                match (&self.packed, isa()) {
                    // One to a few rows: the scaled kernels (half the arithmetic per block, which is
                    // what so few rows are bound by); up to three rows, one weight row per pass;
                    // more rows, two weight rows per pass, sharing each activation load.
                    (Packed::Q4_1 { d, m, qs }, Isa::Avx512)
                        if n <= x86::SCALED_ROWS_AVX512 && nb <= x86::SCALED_BLOCKS =>
                    {
                        x86::q4_1_tile_scaled_avx512(qs, d, m, nb, r0, r1, x, n, out.0, ldy)
                    }
                    (Packed::Q8_0 { d, qs }, Isa::Avx512)
                        if n <= x86::SCALED_ROWS_AVX512 && nb <= x86::SCALED_BLOCKS =>
                    {
                        x86::q8_0_tile_scaled_avx512(qs, d, nb, r0, r1, x, n, out.0, ldy)
                    }
                    (Packed::Q4_1 { d, m, qs }, Isa::Avx512) if n < PAIR_ROWS => {
                        x86::q4_1_tile_avx512(qs, d, m, nb, r0, r1, x, n, out.0, ldy)
                    }
                    (Packed::Q4_1 { d, m, qs }, Isa::Avx512) => {
                        x86::q4_1_tile_pairs_avx512(qs, d, m, nb, r0, r1, x, n, out.0, ldy)
                    }
                    (Packed::Q8_0 { d, qs }, Isa::Avx512) if n < PAIR_ROWS => {
                        x86::q8_0_tile_avx512(qs, d, &[], nb, r0, r1, x, n, out.0, ldy)
                    }
                    (Packed::Q4_1 { d, m, qs }, Isa::Avx2) if n <= x86::SCALED_ROWS && nb <= x86::SCALED_BLOCKS => {
                        x86::q4_1_tile_scaled_avx2(qs, d, m, nb, r0, r1, x, n, out.0, ldy)
                    }
                    (Packed::Q4_1 { d, m, qs }, Isa::Avx2) => {
                        x86::q4_1_tile_avx2(qs, d, m, nb, r0, r1, x, n, out.0, ldy)
                    }
                    (Packed::Q8_0 { d, qs }, Isa::Avx512) => {
                        x86::q8_0_tile_pairs_avx512(qs, d, nb, r0, r1, x, n, out.0, ldy)
                    }
                    (Packed::Q8_0 { d, qs }, Isa::Avx2) if n <= x86::SCALED_ROWS && nb <= x86::SCALED_BLOCKS => {
                        x86::q8_0_tile_scaled_avx2(qs, d, nb, r0, r1, x, n, out.0, ldy)
                    }
                    (Packed::Q8_0 { d, qs }, Isa::Avx2) => {
                        x86::q8_0_tile_avx2(qs, d, &[], nb, r0, r1, x, n, out.0, ldy)
                    }
                    _ => self.fused_tile_portable(x, n, r0, r1, out, ldy),
                }
            }
            return;
        }
        #[allow(unreachable_code)]
        // SAFETY: forwarded from the caller.
        unsafe {
            self.fused_tile_portable(x, n, r0, r1, out, ldy)
        }
    }

    /// # Safety
    /// As for [`Self::fused_tile`].
    unsafe fn fused_tile_portable(&self, x: &[f32], n: usize, r0: usize, r1: usize, out: OutPtr, ldy: usize) {
        let cols = self.cols;
        let group = fused_group();
        for r in r0..r1 {
            // The weight row stays in L1 while each group of activation rows passes over it.
            for g0 in (0..n).step_by(group) {
                let gn = group.min(n - g0);
                let acc = self.fused_row(r, &x[g0 * cols..], gn);
                for (i, a) in acc.iter().enumerate().take(gn) {
                    // SAFETY: the caller guarantees this element is ours.
                    unsafe { *out.0.add((g0 + i) * ldy + r) = *a };
                }
            }
        }
    }

    /// Row `r` of the weights against `n ≤ FUSED_ROWS` activation rows.
    fn fused_row(&self, r: usize, x: &[f32], n: usize) -> [f32; FUSED_ROWS] {
        let (cols, nb) = (self.cols, self.cols / BLOCK);
        let isa = isa();
        let mut acc = [0f32; FUSED_ROWS];
        match &self.packed {
            Packed::Q4_1 { d, m, qs } => {
                let (d, m, q) =
                    (&d[r * nb..(r + 1) * nb], &m[r * nb..(r + 1) * nb], &qs[r * nb * 16..(r + 1) * nb * 16]);
                q4_1_rows(isa, q, d, m, x, cols, n, &mut acc);
            }
            Packed::Q8_0 { d, qs } => {
                let (d, q) = (&d[r * nb..(r + 1) * nb], &qs[r * cols..(r + 1) * cols]);
                q8_0_rows(isa, q, d, x, cols, n, &mut acc);
            }
            Packed::F32(w) => {
                let w = &w[r * cols..(r + 1) * cols];
                for (i, a) in acc.iter_mut().enumerate().take(n) {
                    *a = dot(w, &x[i * cols..(i + 1) * cols]);
                }
            }
        }
        acc
    }

    /// # Safety
    /// As for [`Self::fused_tile`].
    unsafe fn gemm_tile(&self, x: &[f32], n: usize, r0: usize, r1: usize, out: OutPtr, ldy: usize) {
        let cols = self.cols;
        let width = r1 - r0;
        let run = |w: &[f32]| {
            // dst[i, j] = Σ_k x[i, k] · w[j, k]: rhs is wᵀ, read with a column stride of `cols`.
            // SAFETY: every pointer and stride below addresses memory of the sizes checked in
            // `matmul`; `dst` is this tile's columns, which no other task touches.
            unsafe {
                gemm::gemm(
                    n,
                    width,
                    cols,
                    out.0.add(r0),
                    1,
                    ldy as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    w.as_ptr(),
                    cols as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        };
        match &self.packed {
            Packed::F32(v) => run(&v[r0 * cols..r1 * cols]),
            _ => SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < width * cols {
                    s.resize(width * cols, 0.0);
                }
                self.rows_into(r0, r1, &mut s);
                run(&s[..width * cols]);
            }),
        }
    }
}

/// Runs `tile(0..tiles)` on every thread of the current rayon pool, each thread claiming the
/// next unclaimed tile from a shared counter until none is left; the calling thread first runs
/// `first` and returns its result. A thread that starts late (or is busy with `first`) simply
/// claims fewer tiles, so the threads finish within one tile of each other. (Rayon's own
/// splitting of a range cannot split a piece once a thread has started it: on one stream with
/// an adapter, matmuls took 73.5 µs in which each thread was busy for ~55, and a thread that
/// waits that long falls asleep and is woken late for the next one.)
fn claimed_tiles<R: Send>(tiles: usize, first: impl FnOnce() -> R + Send, tile: impl Fn(usize) + Sync) -> R {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let claim = || loop {
        let t = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if t >= tiles {
            break;
        }
        tile(t);
    };
    let first = std::sync::Mutex::new(Some(first));
    let result = std::sync::Mutex::new(None);
    (0..rayon::current_num_threads().max(1)).into_par_iter().for_each(|w| {
        if w == 0 {
            let f = first.lock().unwrap_or_else(|e| e.into_inner()).take().expect("the first task runs once");
            *result.lock().unwrap_or_else(|e| e.into_inner()) = Some(f());
        }
        claim();
    });
    result.into_inner().unwrap_or_else(|e| e.into_inner()).expect("the first task ran")
}

/// A low-rank addition to some rows and columns of a matmul's output:
/// `y[row0 + i, col0 + c] += Σ_j t[i, j] · B[c, j]`, with B given in panels of
/// [`crate::lora::PANEL`] columns.
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    pub row0: usize,
    pub rows: usize,
    pub col0: usize,
    pub cols: usize,
    pub rank: usize,
    /// `[rows, rank]`, row-major.
    pub t: &'a [f32],
    /// Panel `p` (columns `p·8 .. p·8 + 8`) is `[rank][8]`, zero-padded past `cols`.
    pub panels: Served<'a>,
}

/// Panics unless every term lies inside an `[n, rows]` output and has the data it claims.
fn check_terms(extra: &[LowRank<'_>], n: usize, rows: usize) {
    for e in extra {
        assert!(e.row0 + e.rows <= n && e.col0 + e.cols <= rows, "low-rank term outside the output");
        assert!(
            e.t.len() >= e.rows * e.rank && e.panels.len() >= e.cols.div_ceil(PANEL) * e.rank * PANEL,
            "low-rank term too short"
        );
    }
}

/// An element of served LoRA weights, widened to f32 in registers.
pub trait Weight: Copy + Send + Sync {
    fn f32(self) -> f32;

    /// `values` as f32: the slice itself when it already is, else widened into `buf`
    /// (which must be at least as long).
    fn widened<'a>(values: &'a [Self], buf: &'a mut [std::mem::MaybeUninit<f32>]) -> &'a [f32];
}

impl Weight for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn widened<'a>(values: &'a [f32], _: &'a mut [std::mem::MaybeUninit<f32>]) -> &'a [f32] {
        values
    }
}

/// A bf16 bit pattern: its f32 value is the same bits shifted up (exact).
impl Weight for u16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }

    #[inline(always)]
    fn widened<'a>(values: &'a [u16], buf: &'a mut [std::mem::MaybeUninit<f32>]) -> &'a [f32] {
        let buf = &mut buf[..values.len()];
        for (w, &v) in buf.iter_mut().zip(values) {
            w.write(v.f32());
        }
        // SAFETY: every element of `buf` was written just above, and MaybeUninit<f32> has
        // f32's layout.
        unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<f32>(), buf.len()) }
    }
}

/// Adds the part of each term that falls in output columns `r0..r1`. Panels wholly inside the
/// range are added as vectors, one panel at a time over all of the term's rows (so a panel is
/// read once per tile); the edges of the range go element by element.
///
/// # Safety
/// As for the tile that wrote those columns (same rows, same columns, same exclusivity).
unsafe fn add_low_rank(extra: &[LowRank<'_>], r0: usize, r1: usize, out: OutPtr, ldy: usize) {
    for e in extra {
        // SAFETY: forwarded from the caller.
        unsafe {
            match e.panels {
                Served::F32(p) => add_term(e, p, r0, r1, out, ldy),
                Served::Bf16(p) => add_term(e, p, r0, r1, out, ldy),
            }
        }
    }
}

/// Largest rank whose panels [`add_term`] widens to f32 once for all of a term's rows (on
/// the stack); larger ranks widen each element where it is used.
const WIDE_RANK: usize = 128;

/// One term of [`add_low_rank`], its panels read as `W`.
///
/// # Safety
/// As for [`add_low_rank`].
unsafe fn add_term<W: Weight>(e: &LowRank<'_>, panels: &[W], r0: usize, r1: usize, out: OutPtr, ldy: usize) {
    let (c0, c1) = (r0.max(e.col0), r1.min(e.col0 + e.cols));
    if c0 >= c1 {
        return;
    }
    let (first, last) = (c0 - e.col0, c1 - e.col0);
    let rank = e.rank;
    // Not zeroed: only the widened part of a panel is ever read.
    let mut wide = [std::mem::MaybeUninit::<f32>::uninit(); PANEL * WIDE_RANK];
    for p in first / PANEL..last.div_ceil(PANEL) {
        let panel = &panels[p * rank * PANEL..(p + 1) * rank * PANEL];
        let whole = p * PANEL >= first && (p + 1) * PANEL <= last;
        // Output columns of this panel that belong to the tile (all of them unless it is the
        // range's edge).
        let cols =
            if whole { 0..PANEL } else { first.max(p * PANEL) - p * PANEL..last.min((p + 1) * PANEL) - p * PANEL };
        let add = |i: usize, acc: &[f32; PANEL]| {
            let at = (e.row0 + i) * ldy + e.col0 + p * PANEL;
            // SAFETY: columns col0 + p·PANEL + cols of this row lie in r0..r1 (the range test
            // above) and so belong to this tile.
            unsafe { add_panel(out.0.add(at), acc, cols.clone()) };
        };
        if rank > WIDE_RANK {
            for i in 0..e.rows {
                let t = &e.t[i * rank..(i + 1) * rank];
                let mut acc = [0f32; PANEL];
                for (j, &tj) in t.iter().enumerate() {
                    for (a, &b) in acc.iter_mut().zip(&panel[j * PANEL..(j + 1) * PANEL]) {
                        *a = tj.mul_add(b.f32(), *a);
                    }
                }
                add(i, &acc);
            }
            continue;
        }
        // The panel widened once for every row of the term; a whole panel then goes to the
        // AVX2 kernel, and the rest (or every panel on a portable machine) four rows at a time
        // (four independent FMA chains per panel row), in the same order of operations.
        let wide = W::widened(panel, &mut wide);
        #[cfg(target_arch = "x86_64")]
        if whole && isa() != Isa::Portable {
            // SAFETY: the ISA was detected; `t` holds the term's rows, `wide` the whole panel,
            // and the panel's 8 columns of each row belong to this tile (forwarded from the
            // caller).
            unsafe {
                x86::panel_rows_avx2(
                    e.t.as_ptr(),
                    e.rows,
                    rank,
                    wide.as_ptr(),
                    out.0.add(e.row0 * ldy + e.col0 + p * PANEL),
                    ldy,
                )
            };
            continue;
        }
        let mut i = 0;
        while i + 4 <= e.rows {
            let acc = panel_rows::<4>(&e.t[i * rank..(i + 4) * rank], rank, wide);
            for (k, a) in acc.iter().enumerate() {
                add(i + k, a);
            }
            i += 4;
        }
        // The last one to three rows in one pass (a term of two rows is common: two streams
        // on one adapter among several).
        let rest: &[[f32; PANEL]] = match e.rows - i {
            0 => &[],
            1 => &panel_rows::<1>(&e.t[i * rank..(i + 1) * rank], rank, wide),
            2 => &panel_rows::<2>(&e.t[i * rank..(i + 2) * rank], rank, wide),
            _ => &panel_rows::<3>(&e.t[i * rank..(i + 3) * rank], rank, wide),
        };
        for (k, a) in rest.iter().enumerate() {
            add(i + k, a);
        }
    }
}

/// `dst[k] += acc[k]` for `k` in `cols`.
///
/// # Safety
/// `dst` is valid for those elements, which no other thread touches meanwhile.
#[inline(always)]
unsafe fn add_panel(dst: *mut f32, acc: &[f32; PANEL], cols: std::ops::Range<usize>) {
    if cols.len() == PANEL {
        // SAFETY: forwarded from the caller.
        let dst = unsafe { &mut *dst.cast::<[f32; PANEL]>() };
        for (d, a) in dst.iter_mut().zip(acc) {
            *d += a;
        }
    } else {
        for k in cols {
            // SAFETY: forwarded from the caller.
            unsafe { *dst.add(k) += acc[k] };
        }
    }
}

/// `Σ_j t[r, j] · wide[j, ..]` for `R` rows of `t` against one widened panel; even and odd
/// `j` go to separate accumulators so that a single row has two FMA chains, not one.
#[inline(always)]
fn panel_rows<const R: usize>(t: &[f32], rank: usize, wide: &[f32]) -> [[f32; PANEL]; R] {
    let mut even = [[0f32; PANEL]; R];
    let mut odd = [[0f32; PANEL]; R];
    let mut j = 0;
    while j + 2 <= rank {
        let (w0, w1) = (&wide[j * PANEL..(j + 1) * PANEL], &wide[(j + 1) * PANEL..(j + 2) * PANEL]);
        for r in 0..R {
            let (t0, t1) = (t[r * rank + j], t[r * rank + j + 1]);
            for l in 0..PANEL {
                even[r][l] = t0.mul_add(w0[l], even[r][l]);
                odd[r][l] = t1.mul_add(w1[l], odd[r][l]);
            }
        }
        j += 2;
    }
    if j < rank {
        let w0 = &wide[j * PANEL..(j + 1) * PANEL];
        for r in 0..R {
            let t0 = t[r * rank + j];
            for l in 0..PANEL {
                even[r][l] = t0.mul_add(w0[l], even[r][l]);
            }
        }
    }
    for r in 0..R {
        for l in 0..PANEL {
            even[r][l] += odd[r][l];
        }
    }
    even
}

/// Activation rows per pass of [`x_a_t`] (each A row is loaded once for all of them).
pub const XA_ROWS: usize = 4;

/// `t[i, j] = x[i] · a[j]` for `rows ≤ XA_ROWS` rows of `x` (stride `in_dim`) and the `rank`
/// rows of `a` (`[rank, in_dim]`): a LoRA term's `x·Aᵀ`.
pub fn x_a_t(x: &[f32], in_dim: usize, rows: usize, a: Served<'_>, rank: usize, t: &mut [f32]) {
    assert!(
        (1..=XA_ROWS).contains(&rows) && x.len() >= rows * in_dim && a.len() >= rank * in_dim && t.len() >= rows * rank,
        "x·Aᵀ operands do not match their shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Portable {
        // SAFETY: the ISA was detected; the lengths were checked above.
        let body = unsafe {
            match (a, isa()) {
                (Served::F32(a), Isa::Avx512) => x86::x_a_t_f32_avx512(x, in_dim, rows, a, rank, t),
                (Served::Bf16(a), Isa::Avx512) => x86::x_a_t_bf16_avx512(x, in_dim, rows, a, rank, t),
                (Served::F32(a), _) => x86::x_a_t_f32_avx2(x, in_dim, rows, a, rank, t),
                (Served::Bf16(a), _) => x86::x_a_t_bf16_avx2(x, in_dim, rows, a, rank, t),
            }
        };
        if body < in_dim {
            for r in 0..rows {
                for j in 0..rank {
                    let tail = (body..in_dim)
                        .fold(t[r * rank + j], |acc, k| a.get(j * in_dim + k).mul_add(x[r * in_dim + k], acc));
                    t[r * rank + j] = tail;
                }
            }
        }
        return;
    }
    match a {
        Served::F32(a) => x_a_t_as(x, in_dim, rows, a, rank, t),
        Served::Bf16(a) => x_a_t_as(x, in_dim, rows, a, rank, t),
    }
}

fn x_a_t_as<W: Weight>(x: &[f32], in_dim: usize, rows: usize, a: &[W], rank: usize, t: &mut [f32]) {
    match rows {
        1 => x_a_t_rows::<1, W>(x, in_dim, a, rank, t),
        2 => x_a_t_rows::<2, W>(x, in_dim, a, rank, t),
        3 => x_a_t_rows::<3, W>(x, in_dim, a, rank, t),
        _ => x_a_t_rows::<XA_ROWS, W>(x, in_dim, a, rank, t),
    }
}

/// The portable [`x_a_t`]: sixteen lanes per row, summed at the end.
fn x_a_t_rows<const R: usize, W: Weight>(x: &[f32], in_dim: usize, a: &[W], rank: usize, t: &mut [f32]) {
    const LANES: usize = 16;
    let body = in_dim / LANES * LANES;
    for j in 0..rank {
        let aj = &a[j * in_dim..(j + 1) * in_dim];
        let mut acc = [[0f32; LANES]; R];
        for k in (0..body).step_by(LANES) {
            let chunk: &[W; LANES] = aj[k..k + LANES].try_into().expect("a whole chunk");
            let av: [f32; LANES] = std::array::from_fn(|l| chunk[l].f32());
            for (r, accr) in acc.iter_mut().enumerate() {
                let xv: &[f32; LANES] = x[r * in_dim + k..r * in_dim + k + LANES].try_into().expect("a whole chunk");
                for l in 0..LANES {
                    accr[l] = av[l].mul_add(xv[l], accr[l]);
                }
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            let mut total: f32 = accr.iter().sum();
            for k in body..in_dim {
                total = aj[k].f32().mul_add(x[r * in_dim + k], total);
            }
            t[r * rank + j] = total;
        }
    }
}

/// Asks for the cache lines of each term's panels that output columns `r0..r1` will read,
/// before the tile's base kernel runs: they then arrive while it works rather than when
/// [`add_low_rank`] needs them.
fn prefetch_low_rank(extra: &[LowRank<'_>], r0: usize, r1: usize) {
    for e in extra {
        let (c0, c1) = (r0.max(e.col0), r1.min(e.col0 + e.cols));
        if c0 < c1 {
            let (p0, p1) = ((c0 - e.col0) / PANEL, (c1 - e.col0).div_ceil(PANEL));
            prefetch::<{ PREFETCH_L1 }>(e.panels, p0 * e.rank * PANEL..p1 * e.rank * PANEL);
        }
    }
}

/// Prefetch hints for [`prefetch`]: into L1, or into L2 only (x86's `_MM_HINT_T0`, `_T1`).
pub const PREFETCH_L1: i32 = 3;
pub const PREFETCH_L2: i32 = 2;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(PREFETCH_L1 == std::arch::x86_64::_MM_HINT_T0 && PREFETCH_L2 == std::arch::x86_64::_MM_HINT_T1);

/// Asks for the cache lines of elements `range` of `w` (a hint: no-op off x86-64).
pub fn prefetch<const HINT: i32>(w: Served<'_>, range: std::ops::Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    {
        let (base, size, len) = match w {
            Served::F32(v) => (v.as_ptr().cast::<u8>(), 4, v.len()),
            Served::Bf16(v) => (v.as_ptr().cast::<u8>(), 2, v.len()),
        };
        for at in (range.start.min(len) * size..range.end.min(len) * size).step_by(64) {
            // SAFETY: a prefetch is only a hint, and the address lies inside `w`.
            unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(base.add(at).cast()) };
        }
    }
}

thread_local! {
    /// A dequantized weight tile per worker thread, reused across calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A matmul's activations rounded to 8 bits, on the thread that calls it (taken out
    /// for the call, so a nested matmul would simply start a buffer of its own).
    static Q8_SCRATCH: std::cell::RefCell<q8::Q8Rows> = std::cell::RefCell::new(q8::Q8Rows::default());
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements through it (see `matmul`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Rows per tile for the fused kernels on `n` activation rows: enough tiles for the threads
/// that claim them ([`claimed_tiles`]) to finish close together, few enough that scheduling
/// costs little next to the arithmetic. A tile of a decode step of a few rows is short, so
/// those steps cut finer (32 tiles a thread rather than 8: one stream with an adapter went
/// from 0.93 to 0.95 of the base rate in process; sixteen streams were no different either way).
fn fused_tile(rows: usize, n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per_thread = if n <= FINE_TILE_ROWS { 32 } else { 8 };
    (rows / (threads * per_thread)).clamp(16, 512)
}

/// Decode steps of at most this many activation rows take the finer tiles of [`fused_tile`].
const FINE_TILE_ROWS: usize = 4;

/// Σ_j qᵢⱼ·xᵢⱼ scaled by each block's `d`, for `n ≤ 8` activation rows, into `acc[..n]`.
#[allow(clippy::too_many_arguments)]
fn q4_1_rows(isa: Isa, q: &[u8], d: &[f32], m: &[f32], x: &[f32], cols: usize, n: usize, acc: &mut [f32; FUSED_ROWS]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the ISA was detected at run time; slices have the lengths the kernels read.
        match isa {
            Isa::Avx512 => return unsafe { x86::q4_1_avx512(q, d, m, x, cols, n, acc) },
            Isa::Avx2 => return unsafe { x86::q4_1_avx2(q, d, m, x, cols, n, acc) },
            Isa::Portable => {}
        }
    }
    let _ = isa;
    for (i, a) in acc.iter_mut().enumerate().take(n) {
        let xr = &x[i * cols..(i + 1) * cols];
        let mut total = 0f32;
        for (b, (&db, &mb)) in d.iter().zip(m).enumerate() {
            let (qb, xb) = (&q[b * 16..b * 16 + 16], &xr[b * BLOCK..(b + 1) * BLOCK]);
            for j in 0..16 {
                total = ((qb[j] & 0x0F) as f32 * db + mb).mul_add(xb[j], total);
                total = ((qb[j] >> 4) as f32 * db + mb).mul_add(xb[j + 16], total);
            }
        }
        *a = total;
    }
}

/// Σ_j dᵢ·qᵢⱼ·xᵢⱼ for Q8_0 rows, for `n ≤ 8` activation rows, into `acc[..n]`.
fn q8_0_rows(isa: Isa, q: &[i8], d: &[f32], x: &[f32], cols: usize, n: usize, acc: &mut [f32; FUSED_ROWS]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: as in `q4_1_rows`.
        match isa {
            Isa::Avx512 => return unsafe { x86::q8_0_avx512(q, d, x, cols, n, acc) },
            Isa::Avx2 => return unsafe { x86::q8_0_avx2(q, d, x, cols, n, acc) },
            Isa::Portable => {}
        }
    }
    let _ = isa;
    for (i, a) in acc.iter_mut().enumerate().take(n) {
        let xr = &x[i * cols..(i + 1) * cols];
        let mut total = 0f32;
        for (b, &db) in d.iter().enumerate() {
            for (&q, &x) in q[b * BLOCK..(b + 1) * BLOCK].iter().zip(&xr[b * BLOCK..]) {
                total = (q as f32 * db).mul_add(x, total);
            }
        }
        *a = total;
    }
}

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

#[cfg(test)]
mod tests;
