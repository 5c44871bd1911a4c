//! The packed kernels against a plain f32 reference, on every instruction set this CPU has.

use super::low_rank::add_low_rank;
use super::tiles::{claimed_tiles, q4_1_rows, q8_0_rows, FUSED_MAX};
use super::*;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use half::f16;
use std::borrow::Cow;

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// GGML blocks with small, finite f16 scales and random payloads.
fn q4_1_blocks(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut raw = bytes(rows * cols / BLOCK * 20, seed);
    for (i, b) in raw.chunks_exact_mut(20).enumerate() {
        b[0..2].copy_from_slice(&f16::from_f32(0.01 + (i % 7) as f32 * 0.003).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-0.05 + (i % 5) as f32 * 0.01).to_le_bytes());
    }
    raw
}

fn q8_0_blocks(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut raw = bytes(rows * cols / BLOCK * 34, seed);
    for (i, b) in raw.chunks_exact_mut(34).enumerate() {
        b[0..2].copy_from_slice(&f16::from_f32(0.002 + (i % 3) as f32 * 0.001).to_le_bytes());
    }
    raw
}

fn activations(n: usize, cols: usize) -> Vec<f32> {
    bytes(n * cols, 99).iter().map(|&b| (b as f32 - 128.0) / 64.0).collect()
}

fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * rows];
    for i in 0..n {
        for r in 0..rows {
            y[i * rows + r] =
                (0..cols).map(|k| (x[i * cols + k] as f64) * (w[r * cols + k] as f64)).sum::<f64>() as f32;
        }
    }
    y
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-4 * (1.0 + w.abs());
        assert!((g - w).abs() <= tol, "{what}: element {i} is {g}, want {w}");
    }
}

fn check_all_sizes(m: &QMatrix, what: &str) {
    let (rows, cols) = (m.rows(), m.cols());
    let w = m.to_dense();
    for n in [1, 2, 3, 4, 5, 8, 9, 17, 32, 33, 70] {
        let x = activations(n, cols);
        let want = reference(&w, &x, rows, cols, n);
        // Written into a wider output to check the row stride.
        let ldy = rows + 3;
        let mut y = vec![f32::NAN; n * ldy];
        m.matmul(&x, n, &mut y, ldy);
        let got: Vec<f32> = (0..n).flat_map(|i| y[i * ldy..i * ldy + rows].to_vec()).collect();
        assert_close(&got, &want, &format!("{what}, n = {n}"));
        for i in 0..n {
            assert!(y[i * ldy + rows..(i + 1) * ldy].iter().all(|v| v.is_nan()), "{what}: wrote past the row");
        }
    }
}

#[test]
fn dequantized_rows_equal_candles_dequantize_bit_for_bit() {
    let (rows, cols) = (6, 64);
    for (dtype, raw) in [(GgmlDType::Q4_1, q4_1_blocks(rows, cols, 1)), (GgmlDType::Q8_0, q8_0_blocks(rows, cols, 2))] {
        let storage = QStorage::from_data(Cow::Borrowed(raw.as_slice()), &Device::Cpu, dtype).unwrap();
        let qt = QTensor::new(storage, (rows, cols)).unwrap();
        let want = qt.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let m = QMatrix::from_qtensor(&qt).unwrap();
        assert_eq!(m.to_dense(), want, "{dtype:?}");
    }
}

#[test]
fn q4_1_matmul_matches_the_dense_reference() {
    check_all_sizes(&QMatrix::from_q4_1_bytes(&q4_1_blocks(67, 96, 3), 67, 96), "q4_1");
}

#[test]
fn q8_0_matmul_matches_the_dense_reference() {
    check_all_sizes(&QMatrix::from_q8_0_bytes(&q8_0_blocks(45, 128, 4), 45, 128), "q8_0");
}

#[test]
fn dense_matmul_matches_the_reference() {
    let (rows, cols) = (33, 40);
    let w: Vec<f32> = activations(rows, cols).iter().map(|v| v * 0.1).collect();
    check_all_sizes(&QMatrix::dense(w, rows, cols), "f32");
}

#[test]
fn every_instruction_set_gives_the_same_sums() {
    let (rows, cols) = (3, 128);
    let m4 = QMatrix::from_q4_1_bytes(&q4_1_blocks(rows, cols, 5), rows, cols);
    let m8 = QMatrix::from_q8_0_bytes(&q8_0_blocks(rows, cols, 6), rows, cols);
    let mut isas = vec![Isa::Portable];
    if isa() == Isa::Avx512 {
        isas.push(Isa::Avx512);
    }
    if matches!(isa(), Isa::Avx512 | Isa::Avx2) {
        isas.push(Isa::Avx2);
    }
    let x = activations(4, cols);
    let (Packed::Q4_1 { d: d4, m: mn4, qs: q4 }, Packed::Q8_0 { d: d8, qs: q8 }) = (&m4.packed, &m8.packed) else {
        panic!("unexpected packing");
    };
    let nb = cols / BLOCK;
    let mut first: Option<([f32; FUSED_ROWS], [f32; FUSED_ROWS])> = None;
    for isa in isas {
        let (mut a4, mut a8) = ([0f32; FUSED_ROWS], [0f32; FUSED_ROWS]);
        q4_1_rows(isa, &q4[..nb * 16], &d4[..nb], &mn4[..nb], &x, cols, 4, &mut a4);
        q8_0_rows(isa, &q8[..cols], &d8[..nb], &x, cols, 4, &mut a8);
        match first {
            None => first = Some((a4, a8)),
            Some((b4, b8)) => {
                assert_close(&a4, &b4, &format!("q4_1 on {isa:?}"));
                assert_close(&a8, &b8, &format!("q8_0 on {isa:?}"));
            }
        }
    }
}

#[test]
fn concatenated_rows_multiply_like_the_parts() {
    let a = QMatrix::from_q4_1_bytes(&q4_1_blocks(8, 64, 7), 8, 64);
    let b = QMatrix::from_q4_1_bytes(&q4_1_blocks(4, 64, 8), 4, 64);
    let c = QMatrix::dense(activations(5, 64), 5, 64);
    for fused in [QMatrix::concat_rows(&[&a, &b]), QMatrix::concat_rows(&[&a, &b, &c])] {
        let mut want = a.to_dense();
        want.extend(b.to_dense());
        if fused.rows() == 17 {
            want.extend(c.to_dense());
        }
        assert_eq!(fused.to_dense(), want);
    }
}

/// Runs a tile kernel, `run(packed, nb, rows, x, n, y)`, over the whole of a 9 × 96 matrix
/// of each packed format (three blocks a row, an odd count) for every `n` in `ns`, and checks
/// its `[n, rows]` output against the reference.
#[cfg(target_arch = "x86_64")]
fn check_tile_kernel(
    what: &str,
    ns: std::ops::RangeInclusive<usize>,
    run: impl Fn(&Packed, usize, usize, &[f32], usize, &mut [f32]),
) {
    let (rows, cols) = (9, 96);
    for m in [
        QMatrix::from_q4_1_bytes(&q4_1_blocks(rows, cols, 9), rows, cols),
        QMatrix::from_q8_0_bytes(&q8_0_blocks(rows, cols, 10), rows, cols),
    ] {
        for n in ns.clone() {
            let x = activations(n, cols);
            let want = reference(&m.to_dense(), &x, rows, cols, n);
            let mut y = vec![0f32; n * rows];
            run(&m.packed, cols / BLOCK, rows, &x, n, &mut y);
            assert_close(&y, &want, &format!("{what}, n = {n}"));
        }
    }
}

/// The AVX2 tile kernels (used where AVX-512 is missing), and the scaled ones for one to three
/// rows, against the reference, on any CPU that has AVX2, including ones that would pick
/// AVX-512.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_tiles_match_the_reference() {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        return;
    }
    // SAFETY (both closures): AVX2 and FMA were detected; the slices are the whole matrix and
    // `y` is n × rows; the scaled kernels get n ≤ SCALED_ROWS and three blocks a row.
    check_tile_kernel("avx2 tile", 6..=6, |packed, nb, rows, x, n, y| unsafe {
        match packed {
            Packed::Q4_1 { d, m, qs } => x86::q4_1_tile_avx2(qs, d, m, nb, 0, rows, x, n, y.as_mut_ptr(), rows),
            Packed::Q8_0 { d, qs } => x86::q8_0_tile_avx2(qs, d, &[], nb, 0, rows, x, n, y.as_mut_ptr(), rows),
            Packed::F32(_) => unreachable!("packed matrices only"),
        }
    });
    check_tile_kernel("avx2 scaled tile", 1..=x86::SCALED_ROWS, |packed, nb, rows, x, n, y| unsafe {
        match packed {
            Packed::Q4_1 { d, m, qs } => x86::q4_1_tile_scaled_avx2(qs, d, m, nb, 0, rows, x, n, y.as_mut_ptr(), rows),
            Packed::Q8_0 { d, qs } => x86::q8_0_tile_scaled_avx2(qs, d, nb, 0, rows, x, n, y.as_mut_ptr(), rows),
            Packed::F32(_) => unreachable!("packed matrices only"),
        }
    });
}

/// The sixteen-at-once reduction adds every vector's lanes in `_mm512_reduce_add_ps`'s order:
/// the same bits for values whose sums round differently in any other order.
#[cfg(target_arch = "x86_64")]
#[test]
fn reduce16_adds_in_the_single_reductions_order() {
    use std::arch::x86_64::*;
    if isa() != Isa::Avx512 {
        return;
    }
    for round in 0..500u64 {
        // Wide magnitudes (1e-6 to 1e6, both signs) make rounding depend on the order.
        let vals: Vec<f32> = crate::testing::values(256, round + 1, 1.0)
            .iter()
            .enumerate()
            .map(|(i, x)| x * 10f32.powi((i % 13) as i32 - 6))
            .collect();
        // SAFETY: AVX-512 was detected; every load reads 16 of the 256 floats.
        let (got, want) = unsafe {
            let v: [__m512; 16] = std::array::from_fn(|k| _mm512_loadu_ps(vals.as_ptr().add(k * 16)));
            (x86::reduce16_avx512(v), v.map(|x| _mm512_reduce_add_ps(x)))
        };
        for (k, w) in want.iter().enumerate() {
            assert_eq!(got[x86::reduced_lane(k)].to_bits(), w.to_bits(), "round {round}, vector {k}");
        }
    }
}

/// The AVX-512 scaled kernels for one to three rows (the dispatcher uses them for one or two)
/// against the reference.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_scaled_tiles_match_the_reference() {
    if isa() != Isa::Avx512 {
        return;
    }
    // SAFETY: AVX-512 was detected; otherwise as for the AVX2 scaled kernels above.
    check_tile_kernel("avx512 scaled tile", 1..=x86::SCALED_ROWS, |packed, nb, rows, x, n, y| unsafe {
        match packed {
            Packed::Q4_1 { d, m, qs } => {
                x86::q4_1_tile_scaled_avx512(qs, d, m, nb, 0, rows, x, n, y.as_mut_ptr(), rows)
            }
            Packed::Q8_0 { d, qs } => x86::q8_0_tile_scaled_avx512(qs, d, nb, 0, rows, x, n, y.as_mut_ptr(), rows),
            Packed::F32(_) => unreachable!("packed matrices only"),
        }
    });
}

#[test]
fn prepared_low_rank_terms_add_what_ready_ones_add() {
    // A Q4_1 matrix with two low-rank terms (f32 and bf16 panels) on different rows and
    // columns, some columns not a multiple of the panel width; the terms computed inside the
    // region must give bit for bit what terms handed over ready give.
    let (rows, cols, rank) = (300, 64, 3);
    let m = QMatrix::from_q4_1_bytes(&q4_1_blocks(rows, cols, 5), rows, cols);
    let panel_len = |c: usize| c.div_ceil(PANEL) * rank * PANEL;
    let p32: Vec<f32> = activations(1, panel_len(101)).iter().map(|v| v * 0.1).collect();
    let p16: Vec<u16> = activations(1, panel_len(77)).iter().map(|v| to_bf16_bits(v * 0.1)).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for n in [1, 2, 3, 4, 7, 9, 40] {
        let x = activations(n, cols);
        let t: Vec<f32> = activations(n, rank).iter().map(|v| v * 0.5).collect();
        let terms = || {
            vec![
                LowRank { row0: 0, rows: n, col0: 7, cols: 101, rank, t: &t, panels: Served::F32(&p32) },
                LowRank {
                    row0: n / 2,
                    rows: n - n / 2,
                    col0: 200,
                    cols: 77,
                    rank,
                    t: &t[(n / 2) * rank..],
                    panels: Served::Bf16(&p16),
                },
            ]
        };
        let ldy = rows + 1;
        let (mut ready, mut prepared) = (vec![0f32; n * ldy], vec![0f32; n * ldy]);
        // A delta buffer left over from a larger call must not leak into this one.
        let mut delta = vec![1.0f32; 3 * n * ldy];
        pool.install(|| {
            m.matmul_plus(&x, n, &mut ready, ldy, &terms());
            m.matmul_plus_prepared(&x, n, &mut prepared, ldy, &mut delta, terms);
        });
        assert_eq!(ready, prepared, "n = {n}");
        let mut plain = vec![0f32; n * ldy];
        m.matmul(&x, n, &mut plain, ldy);
        assert_ne!(ready, plain, "n = {n}: the terms added nothing");
    }
}

#[test]
fn claimed_tiles_run_each_tile_once_and_the_first_task_on_the_calling_thread() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    for threads in [1, 2, 3, 5] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for tiles in [0, 1, 2, 7, 64, 1000] {
            let counts: Vec<AtomicUsize> = (0..tiles).map(|_| AtomicUsize::new(0)).collect();
            let (caller, ran_on) = pool.install(|| {
                let caller = rayon::current_thread_index();
                let ran_on = claimed_tiles(
                    tiles,
                    || {
                        // A slow first task: the other threads take the tiles meanwhile.
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        rayon::current_thread_index()
                    },
                    |t| {
                        counts[t].fetch_add(1, Ordering::Relaxed);
                    },
                );
                (caller, ran_on)
            });
            assert_eq!(ran_on, caller, "{threads} threads, {tiles} tiles: the first task left the calling thread");
            assert!(
                counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                "{threads} threads, {tiles} tiles: a tile ran other than once"
            );
        }
    }
}

#[test]
fn low_rank_terms_add_the_same_bits_on_every_instruction_set() {
    // Whole panels go through the AVX2 panel kernel where the CPU has it, edge panels and
    // other machines through the portable code: both must give what the documented order
    // gives (even and odd j on separate FMA chains, odd ranks ending on the even one, the two
    // summed, then added to the output), bit for bit, for every row count and odd and even
    // ranks, with f32 and bf16 panels, over a tile that starts and ends inside panels.
    let ldy = 61;
    for rank in [1, 2, 3, 8, 9] {
        for rows in [1, 2, 3, 5, 16] {
            let (col0, cols): (usize, usize) = (3, 50);
            let t: Vec<f32> = activations(rows, rank).iter().map(|v| v * 0.7).collect();
            let len = cols.div_ceil(PANEL) * rank * PANEL;
            let p32: Vec<f32> = activations(1, len + 5)[5..].iter().map(|v| v * 0.1).collect();
            let p16: Vec<u16> = p32.iter().map(|&v| to_bf16_bits(v)).collect();
            let wide16: Vec<f32> = p16.iter().map(|&b| b.f32()).collect();
            for (panels, wide) in [(Served::F32(&p32), &p32), (Served::Bf16(&p16), &wide16)] {
                let term = LowRank { row0: 1, rows, col0, cols, rank, t: &t, panels };
                let start: Vec<f32> = activations(rows + 2, ldy).iter().map(|v| v * 0.25).collect();
                let (r0, r1) = (5, 47);
                let mut got = start.clone();
                // SAFETY: the output holds rows 1..=rows of stride ldy, and nothing else touches it.
                unsafe { add_low_rank(&[term], r0, r1, OutPtr(got.as_mut_ptr()), ldy) };
                let mut want = start.clone();
                for i in 0..rows {
                    for c in r0.max(col0) - col0..r1.min(col0 + cols) - col0 {
                        let w = |j: usize| wide[((c / PANEL) * rank + j) * PANEL + c % PANEL];
                        let (mut even, mut odd) = (0f32, 0f32);
                        let mut j = 0;
                        while j + 2 <= rank {
                            even = t[i * rank + j].mul_add(w(j), even);
                            odd = t[i * rank + j + 1].mul_add(w(j + 1), odd);
                            j += 2;
                        }
                        if j < rank {
                            even = t[i * rank + j].mul_add(w(j), even);
                        }
                        want[(1 + i) * ldy + col0 + c] += even + odd;
                    }
                }
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "rank {rank}, {rows} rows"
                );
            }
        }
    }
}

#[test]
fn x_a_t_matches_a_float64_dot_product() {
    // Widths with and without a tail past a multiple of 8 or 16 (the AVX2 and AVX-512 steps),
    // narrower than one step, odd and even ranks, every row count, A in f32 and bf16: against
    // the same products summed in f64.
    for (in_dim, rank) in [(64, 8), (70, 3), (576, 1), (15, 2), (12, 5), (7, 2)] {
        let a32: Vec<f32> = activations(1, rank * in_dim).iter().map(|v| v * 0.3).collect();
        let a16: Vec<u16> = a32.iter().map(|&v| to_bf16_bits(v)).collect();
        for rows in 1..=XA_ROWS {
            let x = activations(rows, in_dim);
            for a in [Served::F32(&a32), Served::Bf16(&a16)] {
                let mut t = vec![f32::NAN; rows * rank];
                x_a_t(&x, in_dim, rows, a, rank, &mut t);
                for r in 0..rows {
                    for j in 0..rank {
                        let want: f64 =
                            (0..in_dim).map(|k| a.get(j * in_dim + k) as f64 * x[r * in_dim + k] as f64).sum();
                        let got = t[r * rank + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "in {in_dim}, rank {rank}, rows {rows}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// What the 8-bit path computes, in f64: with `xq` the rounded activations,
/// `Σ_b dw·dx·Σ qw·qx (+ m·s for Q4_1)`.
fn q8_reference(m: &QMatrix, xq: &q8::Q8Rows, n: usize) -> Vec<f32> {
    let (rows, nb) = (m.rows(), m.cols() / BLOCK);
    let mut y = vec![0f32; n * rows];
    for i in 0..n {
        for r in 0..rows {
            let mut total = 0f64;
            for b in 0..nb {
                let (wb, xb) = (r * nb + b, i * nb + b);
                let xs = &xq.q[xb * BLOCK..(xb + 1) * BLOCK];
                let dx = xq.d[xb] as f64;
                total += match &m.packed {
                    Packed::Q4_1 { d, m, qs } => {
                        let q = &qs[wb * 16..wb * 16 + 16];
                        let dot: i64 = (0..16)
                            .map(|j| (q[j] & 15) as i64 * xs[j] as i64 + (q[j] >> 4) as i64 * xs[j + 16] as i64)
                            .sum();
                        d[wb] as f64 * dx * dot as f64 + m[wb] as f64 * xq.s[xb] as f64
                    }
                    Packed::Q8_0 { d, qs } => {
                        let dot: i64 =
                            qs[wb * BLOCK..(wb + 1) * BLOCK].iter().zip(xs).map(|(&a, &b)| a as i64 * b as i64).sum();
                        d[wb] as f64 * dx * dot as f64
                    }
                    Packed::F32(_) => unreachable!("dense matrices take f32 activations"),
                };
            }
            y[i * rows + r] = total as f32;
        }
    }
    y
}

#[test]
fn q8_rounding_is_the_same_on_every_instruction_set_and_within_half_a_step() {
    let (n, cols) = (3, 160);
    let mut x = activations(n, cols);
    x[32..64].iter_mut().for_each(|v| *v = 0.0); // an all-zero block rounds to d = 0
    x[70] = 1e-30;
    let mut rows = q8::Q8Rows::default();
    rows.quantize(&x, n, cols / BLOCK);
    for b in 0..n * cols / BLOCK {
        let mut q = [0i8; BLOCK];
        let (d, s) = q8::quantize_block(&x[b * BLOCK..(b + 1) * BLOCK], &mut q);
        assert_eq!((rows.d[b].to_bits(), rows.s[b].to_bits()), (d.to_bits(), s.to_bits()), "block {b}: scales");
        assert_eq!(&rows.q[b * BLOCK..(b + 1) * BLOCK], &q, "block {b}: codes");
        for (j, &v) in x[b * BLOCK..(b + 1) * BLOCK].iter().enumerate() {
            assert!(
                (v - d * q[j] as f32).abs() <= d * 0.5001 + f32::MIN_POSITIVE,
                "block {b}, element {j}: {v} rounds to {}",
                d * q[j] as f32
            );
        }
        assert_eq!(s, d * q.iter().map(|&v| v as i32).sum::<i32>() as f32);
    }
    assert_eq!(rows.d[1], 0.0);
    assert!(rows.q[32..64].iter().all(|&v| v == 0));
}

#[test]
fn q8_matmul_matches_its_integer_reference_and_stays_near_f32() {
    for (mut m, what) in [
        (QMatrix::from_q4_1_bytes(&q4_1_blocks(67, 96, 11), 67, 96), "q4_1"),
        (QMatrix::from_q8_0_bytes(&q8_0_blocks(45, 128, 12), 45, 128), "q8_0"),
    ] {
        let (rows, cols) = (m.rows(), m.cols());
        let dense = m.to_dense();
        m.set_activations(Activations::Q8);
        for n in [1, 2, 3, 4, 5, 8, 9, 17, 32, 33] {
            let x = activations(n, cols);
            let ldy = rows + 2;
            let mut y = vec![f32::NAN; n * ldy];
            m.matmul(&x, n, &mut y, ldy);
            let got: Vec<f32> = (0..n).flat_map(|i| y[i * ldy..i * ldy + rows].to_vec()).collect();
            let exact = reference(&dense, &x, rows, cols, n);
            if n > FUSED_MAX {
                // Prompts always take the f32 GEMM.
                assert_close(&got, &exact, &format!("{what}, n = {n} (a prompt)"));
                continue;
            }
            let mut xq = q8::Q8Rows::default();
            xq.quantize(&x, n, cols / BLOCK);
            assert_close(&got, &q8_reference(&m, &xq, n), &format!("{what} with 8-bit activations, n = {n}"));
            let mut portable = vec![0f32; n * rows];
            let codes = m.q8_codes().expect("packed and set to q8");
            let mut acc = [0f32; FUSED_ROWS];
            for g0 in (0..n).step_by(FUSED_ROWS) {
                let gn = FUSED_ROWS.min(n - g0);
                for r in 0..rows {
                    q8::row_portable(codes, r, cols / BLOCK, &xq, g0, gn, &mut acc);
                    (0..gn).for_each(|i| portable[(g0 + i) * rows + r] = acc[i]);
                }
            }
            assert_close(&portable, &got, &format!("{what}: portable against this CPU's kernel, n = {n}"));
            // The rounding is small next to the sums: within 1% of the exact result's size.
            let err: f64 = got.iter().zip(&exact).map(|(g, e)| ((g - e) as f64).powi(2)).sum::<f64>().sqrt();
            let size: f64 = exact.iter().map(|e| (*e as f64).powi(2)).sum::<f64>().sqrt();
            assert!(err <= 0.01 * size, "{what}, n = {n}: 8-bit activations moved the result by {err} (size {size})");
            assert!(
                (0..n).all(|i| y[i * ldy + rows..(i + 1) * ldy].iter().all(|v| v.is_nan())),
                "{what}: wrote past the row"
            );
        }
    }
}
