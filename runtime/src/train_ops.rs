//! Training's fused element-wise ops with hand-written backward passes: RMSNorm, rotate-half
//! RoPE, the scaled causal softmax and SwiGLU. Each forward and each backward is one pass over
//! memory split across cores, where candle's composed ops would take several single-threaded
//! passes and allocations.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows a parallel task takes at least (below this, splitting costs more than it saves).
const MIN_ELEMS_PER_TASK: usize = 16 * 1024;

/// A custom op's contiguous f32 input as a slice; `what` names the op in the error.
pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        bail!("{what} runs on f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => bail!("{what} needs a contiguous input"),
    }
}

/// Rows of `width` per task so that a task holds about [`MIN_ELEMS_PER_TASK`] elements.
fn rows_per_task(width: usize) -> usize {
    (MIN_ELEMS_PER_TASK / width.max(1)).max(1)
}

fn last_dim(l: &Layout) -> Result<usize> {
    match l.shape().dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => bail!("fused op needs a non-empty last dimension"),
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `x / rms(x) · w` over the last dimension; differentiable with respect to `x` (the norm's
/// weight is frozen while LoRA trains).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let w = Arc::new(w.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?);
    x.contiguous()?.apply_op1(RmsNorm { w, eps })
}

struct RmsNorm {
    w: Arc<Vec<f32>>,
    eps: f32,
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "rms norm")?;
        let n = last_dim(l)?;
        if n != self.w.len() {
            bail!("rms norm over {n} features with a weight of {}", self.w.len());
        }
        let mut y = vec![0f32; x.len()];
        let k = rows_per_task(n);
        y.par_chunks_mut(n * k).zip(x.par_chunks(n * k)).for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_exact_mut(n).zip(xc.chunks_exact(n)) {
                let inv = inv_rms(xr, self.eps);
                for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(self.w.iter()) {
                    *o = v * inv * w;
                }
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = RmsNormBack { w: self.w.clone(), eps: self.eps };
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &back)?))
    }
}

/// `∂L/∂x = inv·(g∘w) − x·inv³·mean(g∘w∘x)` per row.
struct RmsNormBack {
    w: Arc<Vec<f32>>,
    eps: f32,
}

impl CustomOp2 for RmsNormBack {
    fn name(&self) -> &'static str {
        "fused-rms-norm-back"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32s(s1, l1, "rms norm backward")?, f32s(s2, l2, "rms norm backward")?);
        let n = last_dim(l1)?;
        if x.len() != g.len() {
            bail!("rms norm backward: input and gradient differ in size");
        }
        let mut out = vec![0f32; x.len()];
        let k = rows_per_task(n);
        out.par_chunks_mut(n * k).zip(x.par_chunks(n * k).zip(g.par_chunks(n * k))).for_each(|(oc, (xc, gc))| {
            for ((or, xr), gr) in oc.chunks_exact_mut(n).zip(xc.chunks_exact(n)).zip(gc.chunks_exact(n)) {
                let inv = inv_rms(xr, self.eps);
                let dot: f32 = gr.iter().zip(xr).zip(self.w.iter()).map(|((g, x), w)| g * w * x).sum();
                let c = inv * inv * inv * dot / n as f32;
                for (((o, &g), &x), &w) in or.iter_mut().zip(gr).zip(xr).zip(self.w.iter()) {
                    *o = inv * g * w - x * c;
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// Rotate-half RoPE of `x` `[b, heads, t, hd]` with `cos`, `sin` `[b, t, hd/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = x.dims4()?;
    let (cb, ct, half) = cos.dims3()?;
    if cb != b || ct != t || half * 2 != hd || sin.dims3()? != (cb, ct, half) {
        bail!("rope: x is {b}x{h}x{t}x{hd}, cos/sin are {cb}x{ct}x{half}");
    }
    let cos = Arc::new(cos.flatten_all()?.to_vec1::<f32>()?);
    let sin = Arc::new(sin.flatten_all()?.to_vec1::<f32>()?);
    x.contiguous()?.apply_op1(Rope { cos, sin, heads: h, t, inverse: false })
}

/// The rotation; its backward is the inverse rotation (the same angles, negated).
struct Rope {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    heads: usize,
    t: usize,
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "rope")?;
        let hd = last_dim(l)?;
        let half = hd / 2;
        let (heads, t) = (self.heads, self.t);
        if x.len() != self.cos.len() / (t * half).max(1) * heads * t * hd {
            bail!("rope: input size does not match its tables");
        }
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        // One task per (row of the batch, head): t positions of hd values.
        y.par_chunks_mut(t * hd).zip(x.par_chunks(t * hd)).enumerate().for_each(|(bh, (yc, xc))| {
            let b = bh / heads;
            for p in 0..t {
                let table = (b * t + p) * half;
                let (cos, sin) = (&self.cos[table..table + half], &self.sin[table..table + half]);
                let (xr, yr) = (&xc[p * hd..(p + 1) * hd], &mut yc[p * hd..(p + 1) * hd]);
                let (x1, x2) = xr.split_at(half);
                let (y1, y2) = yr.split_at_mut(half);
                for i in 0..half {
                    let (c, s) = (cos[i], sign * sin[i]);
                    y1[i] = x1[i] * c - x2[i] * s;
                    y2[i] = x2[i] * c + x1[i] * s;
                }
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back =
            Rope { cos: self.cos.clone(), sin: self.sin.clone(), heads: self.heads, t: self.t, inverse: !self.inverse };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Causal softmax

/// `softmax(scale · s)` over the last dimension of scores `[.., rows, len]`, where row `r`
/// is the query at position `offset + r % t` and sees keys `0..=offset + r % t` (later keys
/// get probability 0).
pub fn causal_softmax(scores: &Tensor, scale: f32, t: usize, offset: usize) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax { scale, t, offset })
}

struct CausalSoftmax {
    scale: f32,
    t: usize,
    offset: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "causal softmax")?;
        let len = last_dim(l)?;
        let mut y = vec![0f32; x.len()];
        let k = rows_per_task(len);
        let (t, offset, scale) = (self.t.max(1), self.offset, self.scale);
        y.par_chunks_mut(len * k).zip(x.par_chunks(len * k)).enumerate().for_each(|(task, (yc, xc))| {
            for (i, (yr, xr)) in yc.chunks_exact_mut(len).zip(xc.chunks_exact(len)).enumerate() {
                let row = task * k + i;
                let seen = (offset + row % t + 1).min(len);
                let max = xr[..seen].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut sum = 0.0f32;
                for (o, &v) in yr[..seen].iter_mut().zip(&xr[..seen]) {
                    *o = ((v - max) * scale).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                yr[..seen].iter_mut().for_each(|o| *o *= inv);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBack { scale: self.scale })?))
    }
}

/// `∂L/∂s = scale · p∘(g − Σ g∘p)` per row (masked keys have p = 0 and get 0).
struct SoftmaxBack {
    scale: f32,
}

impl CustomOp2 for SoftmaxBack {
    fn name(&self) -> &'static str {
        "fused-causal-softmax-back"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (p, g) = (f32s(s1, l1, "softmax backward")?, f32s(s2, l2, "softmax backward")?);
        let len = last_dim(l1)?;
        let mut out = vec![0f32; p.len()];
        let k = rows_per_task(len);
        out.par_chunks_mut(len * k).zip(p.par_chunks(len * k).zip(g.par_chunks(len * k))).for_each(|(oc, (pc, gc))| {
            for ((or, pr), gr) in oc.chunks_exact_mut(len).zip(pc.chunks_exact(len)).zip(gc.chunks_exact(len)) {
                let dot: f32 = pr.iter().zip(gr).map(|(p, g)| p * g).sum();
                for ((o, &p), &g) in or.iter_mut().zip(pr).zip(gr) {
                    *o = self.scale * p * (g - dot);
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) ∘ up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Applies `f(gate, up, g)` element-wise over equally long inputs, split across cores.
fn map3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(MIN_ELEMS_PER_TASK)
        .zip(a.par_chunks(MIN_ELEMS_PER_TASK).zip(b.par_chunks(MIN_ELEMS_PER_TASK)))
        .zip(c.par_chunks(MIN_ELEMS_PER_TASK))
        .for_each(|((o, (a, b)), c)| {
            for (((o, &a), &b), &c) in o.iter_mut().zip(a).zip(b).zip(c) {
                *o = f(a, b, c);
            }
        });
    out
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (f32s(s1, l1, "swiglu")?, f32s(s2, l2, "swiglu")?);
        if g.len() != u.len() {
            bail!("swiglu: gate and up differ in size");
        }
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(g.par_chunks(MIN_ELEMS_PER_TASK).zip(u.par_chunks(MIN_ELEMS_PER_TASK)))
            .for_each(|(y, (g, u))| {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = g * sigmoid(g) * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let d_gate = gate.apply_op3_no_bwd(up, &grad, &SwiGluBack { gate: true })?;
        let d_up = gate.apply_op3_no_bwd(up, &grad, &SwiGluBack { gate: false })?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// `∂L/∂gate = g·up·σ(gate)·(1 + gate·(1 − σ(gate)))`, `∂L/∂up = g·silu(gate)`.
struct SwiGluBack {
    gate: bool,
}

impl CustomOp3 for SwiGluBack {
    fn name(&self) -> &'static str {
        "fused-swiglu-back"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, u, g) =
            (f32s(s1, l1, "swiglu backward")?, f32s(s2, l2, "swiglu backward")?, f32s(s3, l3, "swiglu backward")?);
        if a.len() != u.len() || a.len() != g.len() {
            bail!("swiglu backward: inputs differ in size");
        }
        let out = if self.gate {
            map3(a, u, g, |a, u, g| {
                let s = sigmoid(a);
                g * u * s * (1.0 + a * (1.0 - s))
            })
        } else {
            map3(a, u, g, |a, _, g| g * a * sigmoid(a))
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let (a, b) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }

    fn var(shape: &[usize], seed: u64) -> Var {
        let n = shape.iter().product();
        Var::from_tensor(&Tensor::from_vec(crate::testing::values(n, seed, 1.0), shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// The fused op and candle's composed ops agree on the value and on the gradient of
    /// `Σ f(x)·r` for a random `r`.
    fn check(fused: impl Fn(&Tensor) -> Tensor, reference: impl Fn(&Tensor) -> Tensor, shape: &[usize]) {
        let x = var(shape, 3);
        let r = Tensor::from_vec(crate::testing::values(shape.iter().product(), 4, 1.0), shape, &Device::Cpu).unwrap();
        let (a, b) = (fused(x.as_tensor()), reference(x.as_tensor()));
        close(&a, &b, 1e-5);
        let ga = (a * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &r).unwrap().sum_all().unwrap().backward().unwrap();
        close(ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap(), 1e-4);
    }

    #[test]
    fn rms_norm_matches_candle() {
        let w = Tensor::from_vec(crate::testing::values(48, 9, 1.0), 48, &Device::Cpu).unwrap();
        check(
            |x| rms_norm(x, &w, 1e-5).unwrap(),
            |x| candle_nn::ops::rms_norm_slow(x, &w, 1e-5).unwrap(),
            &[3, 700, 48],
        );
    }

    #[test]
    fn rope_matches_candle() {
        let (b, h, t, hd) = (2, 3, 5, 8);
        let cos =
            Tensor::from_vec(crate::testing::values(b * t * hd / 2, 7, 1.0), (b, t, hd / 2), &Device::Cpu).unwrap();
        let sin =
            Tensor::from_vec(crate::testing::values(b * t * hd / 2, 8, 1.0), (b, t, hd / 2), &Device::Cpu).unwrap();
        let reference = |x: &Tensor| {
            let c = Tensor::cat(&[&cos, &cos], D::Minus1).unwrap().unsqueeze(1).unwrap();
            let s = Tensor::cat(&[&sin, &sin], D::Minus1).unwrap().unsqueeze(1).unwrap();
            let half = hd / 2;
            let rot = Tensor::cat(
                &[&x.narrow(D::Minus1, half, half).unwrap().neg().unwrap(), &x.narrow(D::Minus1, 0, half).unwrap()],
                D::Minus1,
            )
            .unwrap();
            (x.broadcast_mul(&c).unwrap() + rot.broadcast_mul(&s).unwrap()).unwrap()
        };
        check(|x| rope(x, &cos, &sin).unwrap(), reference, &[b, h, t, hd]);
    }

    #[test]
    fn causal_softmax_matches_a_masked_softmax() {
        let (rows, t) = (6, 3);
        let reference = |x: &Tensor| {
            let mut mask = vec![0f32; rows * t];
            for r in 0..rows {
                for k in (r % t + 1)..t {
                    mask[r * t + k] = f32::NEG_INFINITY;
                }
            }
            let mask = Tensor::from_vec(mask, (rows, t), &Device::Cpu).unwrap();
            candle_nn::ops::softmax(&(x * 0.5).unwrap().broadcast_add(&mask).unwrap(), D::Minus1).unwrap()
        };
        check(|x| causal_softmax(x, 0.5, t, 0).unwrap(), reference, &[2, rows, t]);
    }

    #[test]
    fn swiglu_matches_candle() {
        let up = var(&[4, 5000], 12);
        let fused = |g: &Tensor| swiglu(g, up.as_tensor()).unwrap();
        let reference = |g: &Tensor| (candle_nn::ops::silu(g).unwrap() * up.as_tensor()).unwrap();
        check(fused, reference, &[4, 5000]);
        // And the gradient reaching `up`.
        let g = var(&[4, 5000], 13);
        let r = Tensor::from_vec(crate::testing::values(20000, 14, 1.0), (4, 5000), &Device::Cpu).unwrap();
        let ga = (swiglu(g.as_tensor(), up.as_tensor()).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = ((candle_nn::ops::silu(g.as_tensor()).unwrap() * up.as_tensor()).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(ga.get(up.as_tensor()).unwrap(), gb.get(up.as_tensor()).unwrap(), 1e-5);
    }
}
