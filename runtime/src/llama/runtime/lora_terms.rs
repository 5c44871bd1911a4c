//! LoRA in the forward pass: each fused matmul's low-rank terms, one per run of sequences on
//! one adapter, the prefetch of the next matmul's halves, and the path for pairs not frozen.

use adapters::LoraModule;
use rayon::prelude::*;

use super::{SeqInput, SharedMut};
use crate::kernels::{prefetch, x_a_t, LowRank, QMatrix, Served, PREFETCH_L2, XA_ROWS};
use crate::lora::{AdapterWeights, LoraPair};

/// From this many multiply-adds, a matmul's `x Aᵀ` products are spread over the pool (below
/// it, waking the other threads costs more than the arithmetic).
const PARALLEL_XA: usize = 1 << 16;

/// The LoRA terms of one fused matmul: for every run of consecutive sequences that share an
/// adapter and every module in `modules` (with the output column its slice of the fused matrix
/// starts at), `t = x Aᵀ` for those rows (computed here, into `bufs`) and `scale·Bᵀ`, which
/// the matmul adds (in its tiles, or in one task on a step of a few rows: see
/// [`QMatrix::matmul_plus_prepared`]). Pairs that are not frozen are left to [`lora`].
/// `next`, if given, names the layer and modules of the following LoRA matmul, whose halves
/// are prefetched (see [`prefetch_next`]).
#[allow(clippy::too_many_arguments)]
fn low_rank_terms<'a>(
    seqs: &[SeqInput<'a>],
    starts: &[usize],
    layer: usize,
    modules: &[(LoraModule, usize)],
    input: &[f32],
    in_dim: usize,
    bufs: &'a mut Vec<Vec<f32>>,
    next: Option<(usize, &[LoraModule])>,
) -> Vec<LowRank<'a>> {
    /// One term before its `t` exists.
    struct Spec<'a> {
        row0: usize,
        rows: usize,
        col0: usize,
        rank: usize,
        cols: usize,
        panels: Served<'a>,
        a: Served<'a>,
    }
    let mut specs: Vec<Spec<'a>> = Vec::new();
    for &(module, col0) in modules {
        let first = specs.len();
        for (s, &start) in seqs.iter().zip(starts) {
            let Some(adapter) = s.adapter else { continue };
            let Some((rank, cols, panels, a)) = adapter.pair(layer, module).and_then(|p| p.halves()) else { continue };
            // Sequences next to each other on the same adapter share one term, so its A and B
            // are read once for all their rows.
            if let Some(last) = specs[first..].last_mut() {
                if std::ptr::eq(last.a.as_ptr(), a.as_ptr()) && last.row0 + last.rows == start {
                    last.rows += s.tokens.len();
                    continue;
                }
            }
            specs.push(Spec { row0: start, rows: s.tokens.len(), col0, rank, cols, panels, a });
        }
    }
    if specs.is_empty() {
        return Vec::new();
    }
    // The next matmul's A and B halves travel to L2 while this thread works and the others
    // run this matmul's tiles.
    if let Some((layer, modules)) = next {
        prefetch_next(seqs, layer, modules);
    }
    while bufs.len() < specs.len() {
        bufs.push(Vec::new());
    }
    for (buf, spec) in bufs.iter_mut().zip(&specs) {
        buf.clear();
        buf.resize(spec.rows * spec.rank, 0.0);
    }
    let work: usize = specs.iter().map(|s| s.rows * s.rank).sum::<usize>() * in_dim;
    let fill = |spec: &Spec<'_>, row: usize, t: &mut [f32]| {
        let x = &input[(spec.row0 + row) * in_dim..];
        x_a_t(x, in_dim, t.len() / spec.rank, spec.a, spec.rank, t);
    };
    if work >= PARALLEL_XA {
        specs.par_iter().zip(bufs.par_iter_mut()).for_each(|(spec, buf)| {
            buf[..spec.rows * spec.rank]
                .par_chunks_mut(XA_ROWS * spec.rank)
                .enumerate()
                .for_each(|(c, t)| fill(spec, c * XA_ROWS, t));
        });
    } else {
        for (spec, buf) in specs.iter().zip(bufs.iter_mut()) {
            for (c, t) in buf[..spec.rows * spec.rank].chunks_mut(XA_ROWS * spec.rank).enumerate() {
                fill(spec, c * XA_ROWS, t);
            }
        }
    }
    let bufs: &'a Vec<Vec<f32>> = bufs;
    specs
        .into_iter()
        .enumerate()
        .map(|(i, s)| LowRank {
            row0: s.row0,
            rows: s.rows,
            col0: s.col0,
            cols: s.cols,
            rank: s.rank,
            t: &bufs[i],
            panels: s.panels,
        })
        .collect()
}

/// Asks for the A and B halves of `modules` in `layer` of every adapter in the step to be
/// brought into L2 ahead of their matmul (the next one), by the thread that has just worked
/// out this matmul's LoRA terms while the others run its tiles. On a few rows the LoRA work
/// is a short pass over A and one over B, which would otherwise wait on memory.
fn prefetch_next(seqs: &[SeqInput<'_>], layer: usize, modules: &[LoraModule]) {
    let mut last: Option<*const AdapterWeights> = None;
    for adapter in seqs.iter().filter_map(|s| s.adapter) {
        if last == Some(adapter as *const _) {
            continue;
        }
        last = Some(adapter as *const _);
        for &module in modules {
            if let Some((_, _, b, a)) = adapter.pair(layer, module).and_then(|p| p.halves()) {
                prefetch::<{ PREFETCH_L2 }>(a, 0..a.len());
                prefetch::<{ PREFETCH_L2 }>(b, 0..b.len());
            }
        }
    }
}

/// Up to this many rows in a step, the whole LoRA delta (`x·Aᵀ`, then `t·Bᵀ`) is computed as
/// one task of the base matmul's parallel region ([`QMatrix::matmul_plus_prepared`]) instead
/// of before it and in its tiles.
pub(super) const PREPARED_ROWS: usize = 4;

/// `out = input · Wᵀ` plus the frozen LoRA terms of `modules` for every sequence; `next`
/// names the layer and modules of the following LoRA matmul, whose A and B halves are
/// prefetched on prepared steps only: larger steps spread their LoRA work over the tiles,
/// where the hardware prefetchers follow each panel, and asking for several adapters' halves
/// stalled on the prefetches themselves (2.5% of a sixteen-stream, eight-adapter profile).
#[allow(clippy::too_many_arguments)]
pub(super) fn lora_matmul(
    w: &QMatrix,
    seqs: &[SeqInput<'_>],
    starts: &[usize],
    layer: usize,
    modules: &[(LoraModule, usize)],
    input: &[f32],
    in_dim: usize,
    n: usize,
    out: &mut [f32],
    ldy: usize,
    bufs: &mut Vec<Vec<f32>>,
    delta: &mut Vec<f32>,
    prepared: bool,
    next: (usize, &[LoraModule]),
) {
    if prepared {
        w.matmul_plus_prepared(input, n, out, ldy, delta, || {
            low_rank_terms(seqs, starts, layer, modules, input, in_dim, bufs, Some(next))
        });
    } else {
        let terms = low_rank_terms(seqs, starts, layer, modules, input, in_dim, bufs, None);
        w.matmul_plus(input, n, out, ldy, &terms);
    }
}

/// Adds each sequence's LoRA delta for `module` to its rows of `out` (row stride `ldy`,
/// starting at column `col0`), for pairs that are not frozen (frozen ones go through
/// [`low_rank_terms`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn lora(
    seqs: &[SeqInput<'_>],
    starts: &[usize],
    layer: usize,
    module: LoraModule,
    input: &[f32],
    in_dim: usize,
    out: &mut [f32],
    ldy: usize,
    col0: usize,
) {
    let jobs: Vec<(usize, usize, &LoraPair)> = seqs
        .iter()
        .zip(starts)
        .filter_map(|(s, &start)| {
            s.adapter.and_then(|a| a.pair(layer, module)).filter(|p| !p.is_frozen()).map(|p| (start, s.tokens.len(), p))
        })
        .collect();
    let run = |&(start, t, pair): &(usize, usize, &LoraPair), out: &mut [f32]| {
        pair.add_delta_rows(&input[start * in_dim..(start + t) * in_dim], t, out, ldy, col0);
    };
    match jobs.as_slice() {
        [] => {}
        [one] => run(one, &mut out[one.0 * ldy..]),
        _ => {
            // Sequences own disjoint rows of `out`, so their deltas can run side by side.
            let ptr = SharedMut(out.as_mut_ptr());
            let len = out.len();
            jobs.par_iter().for_each(|job| {
                let (start, t) = (job.0, job.1);
                let end = ((start + t) * ldy).min(len);
                // SAFETY: rows start..start + t belong to this sequence alone, and lie in `out`.
                let rows = unsafe { std::slice::from_raw_parts_mut(ptr.at(start * ldy), end - start * ldy) };
                run(job, rows);
            });
        }
    }
}
