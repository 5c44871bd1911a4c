//! A frozen linear layer for training: the forward pass runs on the packed serving kernels and
//! the backward pass returns only the input's gradient, so back-propagating to the LoRA
//! weights never spends a matmul on a gradient for a base weight that will not change.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::kernels::QMatrix;
use crate::train_ops::f32s;

/// `y = x Wᵀ` with W frozen and packed (GGUF blocks as they are): the forward pass runs the
/// serving kernels, the backward pass the input gradient `∂L/∂x = ∂L/∂y · W` from the same
/// packed weights ([`QMatrix::matmul_t`]), so no dense copy is kept. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weights: Arc<QMatrix>,
}

/// The custom op candle records in the graph; holds the weights by reference count.
struct MatmulOp(Arc<QMatrix>);

/// Its backward: `g · W`.
struct InputGradOp(Arc<QMatrix>);

impl FrozenLinear {
    pub fn new(packed: QMatrix) -> Self {
        Self { weights: Arc::new(packed) }
    }

    /// The weight as a dense `[out, in]` f32 tensor.
    pub fn dense(&self) -> candle_core::Result<Tensor> {
        let w = &self.weights;
        Tensor::from_vec(w.to_dense(), (w.rows(), w.cols()), &candle_core::Device::Cpu)
    }

    pub fn packed(&self) -> &QMatrix {
        &self.weights
    }

    /// `x` `[.., in]` → `[.., out]`, differentiable with respect to `x` only.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(MatmulOp(self.weights.clone()))
    }
}

impl CustomOp1 for MatmulOp {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let inp = *dims.last().ok_or_else(|| candle_core::Error::Msg("frozen linear needs a matrix input".into()))?;
        if inp != self.0.cols() {
            candle_core::bail!("frozen linear expects {} inputs, got {inp}", self.0.cols());
        }
        let x = f32s(storage, layout, "frozen linear")?;
        let rows = x.len() / inp.max(1);
        let out = self.0.rows();
        let mut y = vec![0f32; rows * out];
        self.0.matmul(x, rows, &mut y, out);
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&InputGradOp(self.0.clone()))?))
    }
}

impl CustomOp1 for InputGradOp {
    fn name(&self) -> &'static str {
        "frozen-linear-input-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let out = self.0.rows();
        if dims.last() != Some(&out) {
            candle_core::bail!("frozen linear's gradient has {dims:?}, expected {out} outputs");
        }
        let g = f32s(storage, layout, "frozen linear's gradient")?;
        let rows = g.len() / out.max(1);
        let inp = self.0.cols();
        let mut gx = vec![0f32; rows * inp];
        self.0.matmul_t(g, rows, &mut gx);
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = inp;
        }
        Ok((CpuStorage::F32(gx), Shape::from(shape)))
    }
}
