//! Row-wise maths of the forward pass: RMSNorm, rotate-half RoPE, SiLU and a vectorizable `e^x`.

use crate::kernels::dot;

pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = dot(xr, xr) / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// Rotate-half RoPE of one head in place, at the position whose tables are `cos`/`sin`.
pub(super) fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (a, b) = head.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// `act[i] = silu(gate[i]) · up[i]` for each row of `gate_up` (stride `ldg`, gate then up).
pub(super) fn silu_mul(gate_up: &[f32], ldg: usize, inter: usize, act: &mut [f32]) {
    for (gu, a) in gate_up.chunks(ldg).zip(act.chunks_exact_mut(inter)) {
        let (g, u) = gu[..2 * inter].split_at(inter);
        for ((o, &g), &u) in a.iter_mut().zip(g).zip(u) {
            *o = silu(g) * u;
        }
    }
}

/// `g·σ(g)` through [`exp_nonpositive`] (vectorizable; libm's `expf` is a call per element, and
/// a slow one when it overflows): `σ(g) = 1/(1+e^-g)` for `g ≥ 0`, `e^g/(1+e^g)` below.
#[inline]
fn silu(g: f32) -> f32 {
    let e = exp_nonpositive(-g.abs());
    let sigma = if g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
    g * sigma
}

/// `e^x` for `x ≤ 0`, written so the compiler vectorizes it: Cody–Waite range reduction to
/// `|r| ≤ ln2/2` and a degree-7 Taylor polynomial (relative error below 2e-8 before rounding,
/// i.e. within an ulp of libm); inputs below -87 flush to the smallest normal scale.
#[inline]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let n = (x * LOG2E).round();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p: f32 = 1.0 / 5040.0;
    p = p.mul_add(r, 1.0 / 720.0);
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_libm_within_two_ulp() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -(i as f32) * 87.0 / 200_000.0;
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1000.0) < 1e-37);
    }

    #[test]
    fn silu_matches_the_libm_formula() {
        for i in -20_000..=20_000 {
            let g = i as f32 * 0.01;
            let want = (g as f64) / (1.0 + (-(g as f64)).exp());
            let got = silu(g) as f64;
            assert!((got - want).abs() <= 1e-6 * want.abs().max(1e-3), "silu({g}) = {got}, want {want}");
        }
        // Far tails: no overflow, no NaN.
        assert_eq!(silu(1000.0), 1000.0);
        assert!(silu(-1000.0).abs() < 1e-30);
    }
}
