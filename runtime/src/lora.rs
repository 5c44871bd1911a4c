//! LoRA math shared by serving and training: a frozen base linear plus per-row low-rank deltas.
//!
//! `y = x Wᵀ + scale · (x Aᵀ) Bᵀ`, with A `[r, in]` and B `[out, r]` exactly as PEFT stores
//! them. Serving applies a different adapter to different rows of one batch; training uses the
//! same code with A and B backed by `Var`s.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use adapters::peft::{CONFIG_FILE, WEIGHTS_FILE};
use adapters::{AdapterConfig, AdapterError, BaseModelShape, LoraModule, LoraPart, LoraTensorKey};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use crate::frozen::FrozenLinear;
use crate::kernels::{axpy, dot, to_bf16_bits, Served, PANEL};

/// The frozen weight of a linear layer, `[out, in]`.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    /// Quantized (GGUF) weights; inference only.
    Quantized(Arc<QMatMul>),
    /// Dense weights; gradients flow through them to the input.
    Dense(Tensor),
    /// Training: packed forward kernels, and a backward pass that computes only the input's
    /// gradient (the weight never changes, so its gradient would be wasted work).
    Frozen(FrozenLinear),
}

impl BaseWeight {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            BaseWeight::Quantized(q) => q.forward(x),
            BaseWeight::Dense(w) => x.broadcast_matmul(&w.t()?),
            BaseWeight::Frozen(f) => f.forward(x),
        }
    }

    /// The weight as a dense f32 tensor (dequantized when needed).
    pub fn to_dense(&self) -> candle_core::Result<Tensor> {
        match self {
            BaseWeight::Quantized(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.dequantize(&Device::Cpu),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32),
            },
            BaseWeight::Dense(w) => Ok(w.clone()),
            BaseWeight::Frozen(f) => f.dense(),
        }
    }
}

/// One LoRA pair for one module: A `[r, in]`, B `[out, r]` and the scale `alpha / r`
/// (or `alpha / sqrt(r)` with rsLoRA).
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// For frozen (served) pairs: Aᵀ and scale·Bᵀ laid out once. Trained pairs leave it empty:
    /// their A and B change.
    frozen: Option<Frozen>,
    /// Training only: dropout on the LoRA path's input.
    dropout: Option<Arc<Dropout>>,
}

/// LoRA dropout with its own seeded generator, so a resumed training run draws exactly the
/// masks the uninterrupted run would have drawn (candle's dropout uses an unseeded one).
#[derive(Debug)]
pub struct Dropout {
    p: f32,
    rng: parking_lot::Mutex<rand::rngs::StdRng>,
}

impl Dropout {
    pub fn new(p: f32, seed: u64) -> Self {
        use rand::SeedableRng;
        Self { p, rng: parking_lot::Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)) }
    }

    /// Restarts the generator; the trainer calls this before every micro-batch with a seed
    /// derived from the step, so masks depend only on (seed, step).
    pub fn reseed(&self, seed: u64) {
        use rand::SeedableRng;
        *self.rng.lock() = rand::rngs::StdRng::seed_from_u64(seed);
    }

    /// `x` with each element zeroed with probability `p` and the rest scaled by `1/(1-p)`.
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        use rand::Rng;
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - self.p);
        let mut rng = self.rng.lock();
        let mask: Vec<f32> =
            (0..x.elem_count()).map(|_| if rng.random::<f32>() < self.p { 0.0 } else { keep }).collect();
        x * Tensor::from_vec(mask, x.shape(), x.device())?
    }
}

/// Aᵀ `[in, r]` and scale·Bᵀ `[r, out]`, as tensors (for large batches) and as plain row-major
/// vectors (for a few rows, where two tiny gemm calls cost more in dispatch than in arithmetic).
#[derive(Debug, Clone)]
struct Frozen {
    at: Tensor,
    bt: Tensor,
    at_v: Vec<f32>,
    bt_v: Vec<f32>,
    /// A as stored, `[r, in]` row-major: one long dot product per rank for the runtime.
    a_v: Vec<f32>,
    /// What the runtime reads: scale·Bᵀ in panels of [`PANEL`] output columns, each
    /// `[r][PANEL]` (zero-padded), so a panel's columns are added with one contiguous read;
    /// with bf16, A too.
    served: ServedHalves,
    rank: usize,
    out: usize,
}

/// A served pair's halves in the precision chosen at load (f32 reads A from `a_v`).
#[derive(Debug, Clone)]
enum ServedHalves {
    F32 {
        b_panels: Vec<f32>,
    },
    /// Bit patterns of A and of the panels, rounded to bf16.
    Bf16 {
        a: Vec<u16>,
        b_panels: Vec<u16>,
    },
}

/// The precision the serving runtime reads a pair's A and scale·B in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraDtype {
    /// f32: exactly the merged-weight result (the library's default; the gateway serves bf16
    /// unless told `--lora-dtype f32`).
    #[default]
    F32,
    /// bf16 (rounded to nearest even, as vLLM serves adapters in a bf16 model's dtype): half
    /// the memory traffic per token; the delta's elements move by at most 2⁻⁹ relative.
    Bf16,
}

impl std::str::FromStr for LoraDtype {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!("unknown LoRA dtype {other:?}; expected f32 or bf16")),
        }
    }
}

/// Up to this many rows, the delta is computed with plain loops rather than candle matmuls.
const SMALL_ROWS: usize = 4;

impl Frozen {
    /// `x` `[rows, in]` (contiguous f32) → `[rows, out]`.
    fn small_delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, inp) = x.dims2()?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let (r, out) = (self.rank, self.out);
        let mut result = vec![0f32; rows * out];
        let mut t = vec![0f32; r];
        for row in 0..rows {
            t.iter_mut().for_each(|v| *v = 0.0);
            for (i, &xi) in xv[row * inp..(row + 1) * inp].iter().enumerate() {
                for (tj, &a) in t.iter_mut().zip(&self.at_v[i * r..(i + 1) * r]) {
                    *tj += xi * a;
                }
            }
            let dst = &mut result[row * out..(row + 1) * out];
            for (j, &tj) in t.iter().enumerate() {
                for (d, &b) in dst.iter_mut().zip(&self.bt_v[j * out..(j + 1) * out]) {
                    *d += tj * b;
                }
            }
        }
        Tensor::from_vec(result, (rows, out), x.device())
    }
}

impl LoraPair {
    /// A pair whose A and B may still change (training).
    pub fn new(a: Tensor, b: Tensor, scale: f64) -> Self {
        Self { a, b, scale, frozen: None, dropout: None }
    }

    /// A trainable pair whose LoRA path drops inputs with `dropout` (training mode).
    pub fn with_dropout(a: Tensor, b: Tensor, scale: f64, dropout: Arc<Dropout>) -> Self {
        Self { a, b, scale, frozen: None, dropout: Some(dropout) }
    }

    /// A pair that will only be served: its transposed, scaled form is computed once here.
    pub fn frozen(a: Tensor, b: Tensor, scale: f64) -> candle_core::Result<Self> {
        Self::frozen_as(a, b, scale, LoraDtype::F32)
    }

    /// [`Self::frozen`], with the runtime reading the served halves in `dtype`.
    pub fn frozen_as(a: Tensor, b: Tensor, scale: f64, dtype: LoraDtype) -> candle_core::Result<Self> {
        let at = a.t()?.contiguous()?;
        let bt = (b.t()?.contiguous()? * scale)?;
        let (rank, out) = bt.dims2()?;
        let at_v = at.flatten_all()?.to_vec1::<f32>()?;
        let bt_v = bt.flatten_all()?.to_vec1::<f32>()?;
        let a_v = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut b_panels = vec![0f32; out.div_ceil(PANEL) * rank * PANEL];
        for j in 0..rank {
            for c in 0..out {
                b_panels[((c / PANEL) * rank + j) * PANEL + c % PANEL] = bt_v[j * out + c];
            }
        }
        let served = match dtype {
            LoraDtype::F32 => ServedHalves::F32 { b_panels },
            LoraDtype::Bf16 => ServedHalves::Bf16 {
                a: a_v.iter().map(|&v| to_bf16_bits(v)).collect(),
                b_panels: b_panels.iter().map(|&v| to_bf16_bits(v)).collect(),
            },
        };
        Ok(Self { a, b, scale, frozen: Some(Frozen { at, bt, at_v, bt_v, a_v, served, rank, out }), dropout: None })
    }

    /// `scale · (x Aᵀ) Bᵀ` for `x` of shape `[.., in]`.
    pub fn delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.frozen {
            Some(f) if x.rank() == 2 && x.dim(0)? <= SMALL_ROWS && x.dtype() == DType::F32 => f.small_delta(x),
            Some(f) => x.broadcast_matmul(&f.at)?.broadcast_matmul(&f.bt),
            None => {
                let x = match &self.dropout {
                    Some(d) => d.apply(x)?,
                    None => x.clone(),
                };
                // The scale on the rank-r product, the smallest tensor on the path.
                (x.broadcast_matmul(&self.a.t()?)? * self.scale)?.broadcast_matmul(&self.b.t()?)
            }
        }
    }

    /// Adds `scale · (x Aᵀ) Bᵀ` for `n` rows of `x` (`[n, in]`, row-major) into `y`, whose row
    /// `i` starts at `i · ldy + col0`: the serving runtime's delta, written into its fused
    /// projection outputs without a tensor per call.
    pub fn add_delta_rows(&self, x: &[f32], n: usize, y: &mut [f32], ldy: usize, col0: usize) {
        let owned;
        let f = match &self.frozen {
            Some(f) => f,
            None => match LoraPair::frozen(self.a.clone(), self.b.clone(), self.scale) {
                Ok(p) => {
                    owned = p;
                    owned.frozen.as_ref().expect("a frozen pair has its frozen form")
                }
                Err(e) => panic!("LoRA pair is not a pair of f32 matrices: {e}"),
            },
        };
        let (r, out) = (f.rank, f.out);
        let inp = f.a_v.len() / r.max(1);
        let mut t = vec![0f32; r];
        for i in 0..n {
            let xi = &x[i * inp..(i + 1) * inp];
            for (j, tj) in t.iter_mut().enumerate() {
                *tj = dot(&f.a_v[j * inp..(j + 1) * inp], xi);
            }
            let dst = &mut y[i * ldy + col0..i * ldy + col0 + out];
            for (j, &tj) in t.iter().enumerate() {
                axpy(tj, &f.bt_v[j * out..(j + 1) * out], dst);
            }
        }
    }

    /// Whether this pair was made with [`LoraPair::frozen`] (served pairs are).
    pub fn is_frozen(&self) -> bool {
        self.frozen.is_some()
    }

    /// For frozen pairs: the rank, output width, `scale·Bᵀ` in panels (see [`PANEL`]) and A
    /// (`[rank, in]`),
    /// so callers can compute `t = x Aᵀ` themselves and add `t · scale·Bᵀ` where it suits them
    /// (the runtime folds the second half into the base matmul's tiles).
    pub fn halves(&self) -> Option<(usize, usize, Served<'_>, Served<'_>)> {
        let f = self.frozen.as_ref()?;
        Some(match &f.served {
            ServedHalves::Bf16 { a, b_panels } => (f.rank, f.out, Served::Bf16(b_panels), Served::Bf16(a)),
            ServedHalves::F32 { b_panels } => (f.rank, f.out, Served::F32(b_panels), Served::F32(&f.a_v)),
        })
    }

    /// `scale · B A`, the dense `[out, in]` change this pair makes to the base weight.
    pub fn merged_delta(&self) -> candle_core::Result<Tensor> {
        self.b.matmul(&self.a)? * self.scale
    }
}

/// A contiguous run of rows that share one adapter (or none).
#[derive(Debug, Clone, Copy)]
pub struct RowGroup<'a> {
    pub start: usize,
    pub len: usize,
    pub pair: Option<&'a LoraPair>,
}

/// A linear layer of the base model that LoRA can wrap; named after the PEFT module so that
/// adapter files map onto it as they are.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub module: LoraModule,
    pub base: BaseWeight,
}

impl LoraLinear {
    pub fn new(module: LoraModule, base: BaseWeight) -> Self {
        Self { module, base }
    }

    /// One adapter (or none) for every row of `x`.
    pub fn forward(&self, x: &Tensor, pair: Option<&LoraPair>) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        match pair {
            Some(p) => y + p.delta(x)?,
            None => Ok(y),
        }
    }

    /// `x` is `[rows, in]`; each group's rows get that group's adapter. One base matmul serves
    /// every row; the deltas are computed per group and added in place of zeros elsewhere.
    pub fn forward_rows(&self, x: &Tensor, groups: &[RowGroup<'_>]) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        if groups.iter().all(|g| g.pair.is_none()) {
            return Ok(y);
        }
        if let [only] = groups {
            return match only.pair {
                Some(p) => y + p.delta(x)?,
                None => Ok(y),
            };
        }
        let out_dim = y.dim(1)?;
        let mut parts = Vec::with_capacity(groups.len());
        for g in groups {
            let rows = x.narrow(0, g.start, g.len)?;
            parts.push(match g.pair {
                Some(p) => p.delta(&rows)?,
                None => Tensor::zeros((g.len, out_dim), y.dtype(), y.device())?,
            });
        }
        y + Tensor::cat(&parts, 0)?
    }
}

/// Every LoRA pair of one adapter version, indexed by layer and module.
#[derive(Debug, Clone)]
pub struct AdapterWeights {
    layers: Vec<HashMap<LoraModule, LoraPair>>,
    /// Bytes of tensor data held, for the loaded-adapter memory budget.
    pub bytes: usize,
}

impl AdapterWeights {
    /// An adapter that touches nothing (the base model).
    pub fn empty(num_layers: usize) -> Self {
        Self { layers: vec![HashMap::new(); num_layers], bytes: 0 }
    }

    pub fn from_pairs(num_layers: usize, pairs: Vec<(usize, LoraModule, LoraPair)>) -> Self {
        let mut w = Self::empty(num_layers);
        for (layer, module, pair) in pairs {
            w.bytes += (pair.a.elem_count() + pair.b.elem_count()) * 4;
            w.layers[layer].insert(module, pair);
        }
        w
    }

    pub fn pair(&self, layer: usize, module: LoraModule) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|l| l.get(&module))
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Loads a PEFT directory that already passed validation against `shape`. Its errors are
    /// the adapter format's: files that do not load are a bad adapter, not a runtime failure.
    pub fn load_peft_dir(dir: &Path, shape: &BaseModelShape, device: &Device) -> adapters::Result<Self> {
        Self::load_peft_dir_as(dir, shape, device, LoraDtype::F32)
    }

    /// [`Self::load_peft_dir`], served in `dtype`.
    pub fn load_peft_dir_as(
        dir: &Path,
        shape: &BaseModelShape,
        device: &Device,
        dtype: LoraDtype,
    ) -> adapters::Result<Self> {
        let config_bytes = std::fs::read(dir.join(CONFIG_FILE))
            .map_err(|source| AdapterError::Io { path: dir.join(CONFIG_FILE), source })?;
        let config = AdapterConfig::from_json(&config_bytes)?;
        let scale = config.scale();
        let path = dir.join(WEIGHTS_FILE);
        let tensors =
            candle_core::safetensors::load(&path, device).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        let mut a_parts: HashMap<(usize, LoraModule), Tensor> = HashMap::new();
        let mut b_parts: HashMap<(usize, LoraModule), Tensor> = HashMap::new();
        for (name, t) in tensors {
            let key =
                LoraTensorKey::parse(&name).ok_or_else(|| invalid(format!("tensor {name} is not a LoRA weight")))?;
            let t = t.to_dtype(DType::F32).map_err(|e| invalid(format!("tensor {name}: {e}")))?;
            match key.part {
                LoraPart::A => a_parts.insert((key.layer, key.module), t),
                LoraPart::B => b_parts.insert((key.layer, key.module), t),
            };
        }
        let mut pairs = Vec::with_capacity(a_parts.len());
        for ((layer, module), a) in a_parts {
            let b = b_parts
                .remove(&(layer, module))
                .ok_or_else(|| invalid(format!("layer {layer} {} has lora_A without lora_B", module.name())))?;
            let pair = LoraPair::frozen_as(a, b, scale, dtype)
                .map_err(|e| invalid(format!("layer {layer} {}: {e}", module.name())))?;
            pairs.push((layer, module, pair));
        }
        Ok(Self::from_pairs(shape.num_layers, pairs))
    }
}

/// The format's error for adapter files that do not load.
fn invalid(reason: String) -> AdapterError {
    AdapterError::InvalidAdapter { reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn delta_equals_merged_weight() {
        let w = t(&[1., 2., 3., 4., 5., 6.], (2, 3));
        let pair = LoraPair::new(t(&[0.5, -1., 2.], (1, 3)), t(&[1., -2.], (2, 1)), 2.0);
        let frozen = LoraPair::frozen(pair.a.clone(), pair.b.clone(), pair.scale).unwrap();
        let layer = LoraLinear::new(LoraModule::QProj, BaseWeight::Dense(w.clone()));
        let x = t(&[1., 0., -1., 2., 1., 0.], (2, 3));
        let via_lora = layer.forward(&x, Some(&pair)).unwrap();
        let via_frozen = layer.forward(&x, Some(&frozen)).unwrap();
        let same = (&via_lora - via_frozen).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(same < 1e-6, "frozen form differs by {same}");
        let merged = (w + pair.merged_delta().unwrap()).unwrap();
        let via_merge = x.matmul(&merged.t().unwrap()).unwrap();
        let diff = (via_lora - via_merge).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "diff {diff}");
    }

    #[test]
    fn rows_get_their_own_adapter() {
        let w = t(&[1., 0., 0., 1.], (2, 2));
        let p1 = LoraPair::new(t(&[1., 0.], (1, 2)), t(&[1., 0.], (2, 1)), 1.0);
        let p2 = LoraPair::frozen(t(&[0., 1.], (1, 2)), t(&[0., 3.], (2, 1)), 1.0).unwrap();
        let layer = LoraLinear::new(LoraModule::VProj, BaseWeight::Dense(w));
        let x = t(&[1., 1., 1., 1., 1., 1.], (3, 2));
        let groups = [
            RowGroup { start: 0, len: 1, pair: Some(&p1) },
            RowGroup { start: 1, len: 1, pair: None },
            RowGroup { start: 2, len: 1, pair: Some(&p2) },
        ];
        let y = layer.forward_rows(&x, &groups).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![2., 1.], vec![1., 1.], vec![1., 4.]]);
    }
}
