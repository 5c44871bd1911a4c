//! A frozen linear layer for training: the forward pass runs on the packed serving kernels and
//! the backward pass returns only the input's gradient, so back-propagating to the LoRA
//! weights never spends a matmul on a gradient for a base weight that will not change.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::kernels::QMatrix;

/// `y = x Wᵀ` with W frozen: `W` packed for the forward kernels and as a dense tensor for the
/// input gradient `∂L/∂x = ∂L/∂y · W`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weights: Arc<Weights>,
}

#[derive(Debug)]
struct Weights {
    packed: QMatrix,
    dense: Tensor,
}

/// The custom op candle records in the graph; holds the weights by reference count.
struct MatmulOp(Arc<Weights>);

impl FrozenLinear {
    /// `dense` is `[out, in]` f32; `packed` holds exactly the same values (a GGUF weight keeps
    /// its blocks, whose dequantized values are `dense`).
    pub fn new(packed: QMatrix, dense: Tensor) -> candle_core::Result<Self> {
        let (out, inp) = dense.dims2()?;
        if packed.rows() != out || packed.cols() != inp {
            candle_core::bail!("packed weight is {}x{}, dense is {out}x{inp}", packed.rows(), packed.cols());
        }
        Ok(Self { weights: Arc::new(Weights { packed, dense: dense.contiguous()? }) })
    }

    pub fn dense(&self) -> &Tensor {
        &self.weights.dense
    }

    pub fn packed(&self) -> &QMatrix {
        &self.weights.packed
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
        if inp != self.0.packed.cols() {
            candle_core::bail!("frozen linear expects {} inputs, got {inp}", self.0.packed.cols());
        }
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("frozen linear runs on f32 activations");
        };
        let x = match layout.contiguous_offsets() {
            Some((start, end)) => &data[start..end],
            None => candle_core::bail!("frozen linear needs a contiguous input"),
        };
        let rows = x.len() / inp.max(1);
        let out = self.0.packed.rows();
        let mut y = vec![0f32; rows * out];
        self.0.packed.matmul(x, rows, &mut y, out);
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.broadcast_matmul(&self.0.dense)?))
    }
}
