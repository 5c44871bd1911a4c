//! Matmul over a [`QMatrix`]: tiles of output rows claimed by the pool's threads, fused
//! dequantize-and-dot kernels for decode batches and a cache-blocked GEMM for prompts.

use rayon::prelude::*;

use super::low_rank::{add_low_rank, check_terms, prefetch_low_rank};
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{dot, isa, q8, Activations, Isa, LowRank, OutPtr, Packed, QMatrix, BLOCK, FUSED_ROWS};

/// Up to this many activation rows (a decode batch), the fused dequantize-and-dot kernels run,
/// in groups, over each weight row while it is in L1; above it (prompts) a tile of weights is
/// dequantized once and handed to a cache-blocked f32 GEMM.
pub(super) const FUSED_MAX: usize = 32;

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

/// Weight rows [`QMatrix::matmul_t`] dequantizes at a time (256 × 576 f32 fit in L2).
const BACK_TILE: usize = 256;

impl QMatrix {
    /// The matrix's codes for the 8-bit kernels, when it is packed and set to take them.
    pub(super) fn q8_codes(&self) -> Option<q8::Codes<'_>> {
        match (&self.packed, self.activations) {
            (Packed::Q4_1 { d, m, qs }, Activations::Q8) => Some(q8::Codes::Q4_1 { q: qs, d, m }),
            (Packed::Q8_0 { d, qs }, Activations::Q8) => Some(q8::Codes::Q8_0 { q: qs, d }),
            _ => None,
        }
    }

    /// `x` rounded to 8 bits, in the calling thread's reused buffer, when the fused kernels
    /// take 8-bit activations; hand it back with [`Self::give_back`].
    pub(super) fn rounded(&self, x: &[f32], n: usize) -> Option<q8::Q8Rows> {
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
        self.with_dense_rows(r0, r1, run);
    }

    /// Runs `f` on rows `r0..r1` of the weight as dense f32: the stored rows of a dense matrix,
    /// else those rows dequantized into this thread's scratch.
    fn with_dense_rows(&self, r0: usize, r1: usize, f: impl FnOnce(&[f32])) {
        let len = (r1 - r0) * self.cols;
        match &self.packed {
            Packed::F32(v) => f(&v[r0 * self.cols..r1 * self.cols]),
            _ => SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < len {
                    s.resize(len, 0.0);
                }
                self.rows_into(r0, r1, &mut s);
                f(&s[..len]);
            }),
        }
    }
}

impl QMatrix {
    /// `gx = g · W` for `n` rows of `g` `[n, rows]` into `gx` `[n, cols]`: the input gradient of
    /// `y = x Wᵀ`, straight from the packed weights (no dense copy is kept). The weight's rows
    /// are split into one contiguous range per thread; each dequantizes its range a tile at a
    /// time into its scratch and accumulates `g[:, tile] · W[tile, :]` with gemm into a partial
    /// sum of its own, and the partial sums are added at the end.
    pub fn matmul_t(&self, g: &[f32], n: usize, gx: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(g.len() >= n * rows && gx.len() >= n * cols, "matmul_t buffers are too short");
        if n == 0 || rows == 0 {
            gx[..n * cols].iter_mut().for_each(|v| *v = 0.0);
            return;
        }
        let tiles = rows.div_ceil(BACK_TILE);
        let parts = rayon::current_num_threads().clamp(1, tiles);
        let per = tiles.div_ceil(parts);
        let partial = |p: usize, acc: &mut [f32]| {
            let first = p * per;
            let dst = acc.as_mut_ptr();
            for t in first..((p + 1) * per).min(tiles) {
                let (r0, r1) = (t * BACK_TILE, ((t + 1) * BACK_TILE).min(rows));
                let run = |w: &[f32]| {
                    // acc[i, j] (+)= Σ_k g[i, r0 + k] · w[k, j].
                    // SAFETY: `acc` is [n, cols], `g` [n, rows] (checked above) and `w` holds
                    // rows r0..r1 of W, [r1 - r0, cols]; strides below stay inside them.
                    unsafe {
                        gemm::gemm(
                            n,
                            cols,
                            r1 - r0,
                            dst,
                            1,
                            cols as isize,
                            t != first,
                            g.as_ptr().add(r0),
                            1,
                            rows as isize,
                            w.as_ptr(),
                            1,
                            cols as isize,
                            1.0f32,
                            1.0f32,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        )
                    }
                };
                self.with_dense_rows(r0, r1, run);
            }
        };
        let out = &mut gx[..n * cols];
        if parts == 1 {
            partial(0, out);
            return;
        }
        let mut rest: Vec<Vec<f32>> = vec![Vec::new(); parts - 1];
        rayon::join(
            || partial(0, out),
            || {
                rest.par_iter_mut().enumerate().for_each(|(i, acc)| {
                    *acc = vec![0f32; n * cols];
                    partial(i + 1, acc);
                })
            },
        );
        let chunk = (16 * 1024).max(cols);
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
            for acc in &rest {
                for (v, a) in o.iter_mut().zip(&acc[c * chunk..]) {
                    *v += a;
                }
            }
        });
    }
}

/// Runs `tile(0..tiles)` on every thread of the current rayon pool, each thread claiming the
/// next unclaimed tile from a shared counter until none is left; the calling thread first runs
/// `first` and returns its result. A thread that starts late (or is busy with `first`) simply
/// claims fewer tiles, so the threads finish within one tile of each other. (Rayon's own
/// splitting of a range cannot split a piece once a thread has started it: on one stream with
/// an adapter, matmuls took 73.5 µs in which each thread was busy for ~55, and a thread that
/// waits that long falls asleep and is woken late for the next one.)
pub(super) fn claimed_tiles<R: Send>(tiles: usize, first: impl FnOnce() -> R + Send, tile: impl Fn(usize) + Sync) -> R {
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

thread_local! {
    /// A dequantized weight tile per worker thread, reused across calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A matmul's activations rounded to 8 bits, on the thread that calls it (taken out
    /// for the call, so a nested matmul would simply start a buffer of its own).
    static Q8_SCRATCH: std::cell::RefCell<q8::Q8Rows> = std::cell::RefCell::new(q8::Q8Rows::default());
}

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
pub(super) fn q4_1_rows(
    isa: Isa,
    q: &[u8],
    d: &[f32],
    m: &[f32],
    x: &[f32],
    cols: usize,
    n: usize,
    acc: &mut [f32; FUSED_ROWS],
) {
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
pub(super) fn q8_0_rows(isa: Isa, q: &[i8], d: &[f32], x: &[f32], cols: usize, n: usize, acc: &mut [f32; FUSED_ROWS]) {
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
