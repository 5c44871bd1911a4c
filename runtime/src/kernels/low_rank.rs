//! LoRA terms of a matmul: `t = x·Aᵀ` and the addition of `t·(scale·Bᵀ)`, panel by panel,
//! into the output columns a tile has just written.

#[cfg(target_arch = "x86_64")]
use super::{isa, x86, Isa};
use super::{OutPtr, Served, Weight, PANEL};

/// A low-rank addition to some rows and columns of a matmul's output:
/// `y[row0 + i, col0 + c] += Σ_j t[i, j] · B[c, j]`, with B given in panels of
/// [`PANEL`] columns.
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
pub(super) fn check_terms(extra: &[LowRank<'_>], n: usize, rows: usize) {
    for e in extra {
        assert!(e.row0 + e.rows <= n && e.col0 + e.cols <= rows, "low-rank term outside the output");
        assert!(
            e.t.len() >= e.rows * e.rank && e.panels.len() >= e.cols.div_ceil(PANEL) * e.rank * PANEL,
            "low-rank term too short"
        );
    }
}

/// Adds the part of each term that falls in output columns `r0..r1`. Panels wholly inside the
/// range are added as vectors, one panel at a time over all of the term's rows (so a panel is
/// read once per tile); the edges of the range go element by element.
///
/// # Safety
/// As for the tile that wrote those columns (same rows, same columns, same exclusivity).
pub(super) unsafe fn add_low_rank(extra: &[LowRank<'_>], r0: usize, r1: usize, out: OutPtr, ldy: usize) {
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
pub(super) fn prefetch_low_rank(extra: &[LowRank<'_>], r0: usize, r1: usize) {
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
