//! The trainable LoRA pairs (candle `Var`s laid out exactly as PEFT names them), their seeded
//! initialisation, and AdamW with LoRA+ learning-rate groups and state that checkpoints can
//! save and restore bit for bit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use adapters::{BaseModelShape, LoraModule, LoraPart, LoraTensorKey};
use candle_core::{DType, Device, Tensor, Var};
use runtime::lora::{AdapterWeights, Dropout, LoraPair};

use crate::error::FinetuneError;

/// One PEFT tensor: its name, values and shape.
pub type PeftTensor = (LoraTensorKey, Vec<f32>, Vec<usize>);

/// One module's pair in one layer.
pub struct Entry {
    pub layer: usize,
    pub module: LoraModule,
    pub a: Var,
    pub b: Var,
}

/// Every trainable pair of one adapter.
pub struct LoraParams {
    pub entries: Vec<Entry>,
    pub scale: f64,
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    num_layers: usize,
    dropout: Option<Arc<Dropout>>,
}

fn err(e: candle_core::Error) -> FinetuneError {
    FinetuneError::Training { detail: e.to_string() }
}

/// Deterministic uniform values in `[-bound, bound)` (SplitMix64), so initialisation depends
/// only on the seed.
fn uniform(n: usize, seed: u64, bound: f32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
        })
        .collect()
}

impl LoraParams {
    /// A fresh adapter: A uniform in ±1/√in (PEFT's Kaiming-uniform bound), B zero, so the
    /// adapter starts as the base model.
    pub fn init(
        shape: &BaseModelShape,
        targets: &[LoraModule],
        rank: usize,
        alpha: f64,
        use_rslora: bool,
        dropout: f32,
        seed: u64,
    ) -> Result<Self, FinetuneError> {
        let dev = Device::Cpu;
        let scale = if use_rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };
        let mut entries = Vec::new();
        for layer in 0..shape.num_layers {
            for &module in targets {
                let (inp, out) = shape.dims(module);
                let pair_seed = seed ^ ((layer as u64) << 32 | module as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
                let a = Tensor::from_vec(uniform(rank * inp, pair_seed, 1.0 / (inp as f32).sqrt()), (rank, inp), &dev)
                    .map_err(err)?;
                let b = Tensor::zeros((out, rank), DType::F32, &dev).map_err(err)?;
                entries.push(Entry {
                    layer,
                    module,
                    a: Var::from_tensor(&a).map_err(err)?,
                    b: Var::from_tensor(&b).map_err(err)?,
                });
            }
        }
        let dropout = (dropout > 0.0).then(|| Arc::new(Dropout::new(dropout, seed)));
        Ok(Self { entries, scale, rank, alpha, use_rslora, num_layers: shape.num_layers, dropout })
    }

    /// Starts from an existing PEFT adapter (DPO after SFT, or continuing `prod`); its rank,
    /// scale and targets win over the job's.
    pub fn from_peft(dir: &Path, shape: &BaseModelShape, dropout: f32, seed: u64) -> Result<Self, FinetuneError> {
        let checked = adapters::validate_adapter_dir(dir, shape, &adapters::Limits::default())
            .map_err(|e| FinetuneError::Adapter { detail: format!("{}: {e}", dir.display()) })?;
        let scale = checked.config.scale();
        let path = dir.join(adapters::peft::WEIGHTS_FILE);
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).map_err(err)?;
        let mut parts: HashMap<(usize, LoraModule, LoraPart), Tensor> = HashMap::new();
        for (name, t) in tensors {
            if let Some(k) = LoraTensorKey::parse(&name) {
                parts.insert((k.layer, k.module, k.part), t.to_dtype(DType::F32).map_err(err)?);
            }
        }
        let mut entries = Vec::new();
        for layer in 0..shape.num_layers {
            for module in LoraModule::ALL {
                if let (Some(a), Some(b)) =
                    (parts.remove(&(layer, module, LoraPart::A)), parts.remove(&(layer, module, LoraPart::B)))
                {
                    entries.push(Entry {
                        layer,
                        module,
                        a: Var::from_tensor(&a).map_err(err)?,
                        b: Var::from_tensor(&b).map_err(err)?,
                    });
                }
            }
        }
        let dropout = (dropout > 0.0).then(|| Arc::new(Dropout::new(dropout, seed)));
        let (rank, alpha, use_rslora) = (checked.config.r, checked.config.lora_alpha, checked.config.use_rslora);
        Ok(Self { entries, scale, rank, alpha, use_rslora, num_layers: shape.num_layers, dropout })
    }

    /// The adapter the forward pass uses while training (dropout on) or evaluating (off).
    pub fn adapter(&self, training: bool) -> AdapterWeights {
        let pairs = self
            .entries
            .iter()
            .map(|e| {
                let (a, b) = (e.a.as_tensor().clone(), e.b.as_tensor().clone());
                let pair = match (&self.dropout, training) {
                    (Some(d), true) => LoraPair::with_dropout(a, b, self.scale, d.clone()),
                    _ => LoraPair::new(a, b, self.scale),
                };
                (e.layer, e.module, pair)
            })
            .collect();
        AdapterWeights::from_pairs(self.num_layers, pairs)
    }

    /// The current values as a served adapter (for generating with the serving runtime).
    pub fn served(&self) -> Result<AdapterWeights, FinetuneError> {
        let mut pairs = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let a = e.a.as_tensor().detach();
            let b = e.b.as_tensor().detach();
            pairs.push((e.layer, e.module, LoraPair::frozen(a, b, self.scale).map_err(err)?));
        }
        Ok(AdapterWeights::from_pairs(self.num_layers, pairs))
    }

    /// Draws new dropout masks from a generator that depends only on `seed`.
    pub fn reseed_dropout(&self, seed: u64) {
        if let Some(d) = &self.dropout {
            d.reseed(seed);
        }
    }

    /// Every variable in a fixed order (A then B of each entry), with LoRA+'s multiplier.
    pub fn vars(&self, loraplus_ratio: f64) -> Vec<(Var, f64)> {
        self.entries.iter().flat_map(|e| [(e.a.clone(), 1.0), (e.b.clone(), loraplus_ratio)]).collect()
    }

    /// A copy of every value (in [`Self::vars`] order), for keeping the best weights.
    pub fn snapshot(&self) -> Result<Vec<Tensor>, FinetuneError> {
        self.entries.iter().flat_map(|e| [e.a.as_tensor(), e.b.as_tensor()]).map(|t| t.copy().map_err(err)).collect()
    }

    pub fn restore(&self, values: &[Tensor]) -> Result<(), FinetuneError> {
        let vars: Vec<&Var> = self.entries.iter().flat_map(|e| [&e.a, &e.b]).collect();
        if vars.len() != values.len() {
            return Err(FinetuneError::Training { detail: "saved weights do not match the adapter's layout".into() });
        }
        for (v, t) in vars.into_iter().zip(values) {
            v.set(t).map_err(err)?;
        }
        Ok(())
    }

    /// The tensors as PEFT names them, for `adapter_model.safetensors`.
    pub fn peft_tensors(&self, values: &[Tensor]) -> Result<Vec<PeftTensor>, FinetuneError> {
        let mut out = Vec::with_capacity(values.len());
        for (e, pair) in self.entries.iter().zip(values.chunks(2)) {
            for (part, t) in [(LoraPart::A, &pair[0]), (LoraPart::B, &pair[1])] {
                let dims = t.dims().to_vec();
                out.push((
                    LoraTensorKey { layer: e.layer, module: e.module, part },
                    t.flatten_all().map_err(err)?.to_vec1::<f32>().map_err(err)?,
                    dims,
                ));
            }
        }
        Ok(out)
    }

    pub fn targets(&self) -> Vec<LoraModule> {
        let mut t: Vec<LoraModule> = self.entries.iter().map(|e| e.module).collect();
        t.sort();
        t.dedup();
        t
    }
}

/// AdamW (decoupled weight decay) over a fixed list of variables, each with a learning-rate
/// multiplier (LoRA+ gives B a larger one).
pub struct AdamW {
    vars: Vec<(Var, f64)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken (bias correction uses it).
    pub t: usize,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: Vec<(Var, f64)>, weight_decay: f64) -> Result<Self, FinetuneError> {
        let zeros = |v: &Var| v.as_tensor().zeros_like().map_err(err);
        let m = vars.iter().map(|(v, _)| zeros(v)).collect::<Result<_, _>>()?;
        let v = vars.iter().map(|(v, _)| zeros(v)).collect::<Result<_, _>>()?;
        Ok(Self { vars, m, v, t: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay })
    }

    /// One update with `grads` (one per variable, in order) at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<(), FinetuneError> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, ((var, mult), g)) in self.vars.iter().zip(grads).enumerate() {
            let lr = lr * mult;
            let m = ((&self.m[i] * b1).map_err(err)? + (g * (1.0 - b1)).map_err(err)?).map_err(err)?;
            let v =
                ((&self.v[i] * b2).map_err(err)? + (g.sqr().map_err(err)? * (1.0 - b2)).map_err(err)?).map_err(err)?;
            let update = ((&m / c1).map_err(err)?
                / ((&v / c2).map_err(err)?.sqrt().map_err(err)? + self.eps).map_err(err)?)
            .map_err(err)?;
            let theta = var.as_tensor();
            let decayed = if self.weight_decay > 0.0 {
                (theta * (1.0 - lr * self.weight_decay)).map_err(err)?
            } else {
                theta.clone()
            };
            var.set(&(decayed - (update * lr).map_err(err)?).map_err(err)?).map_err(err)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments, for a checkpoint (first all `m`, then all `v`).
    pub fn state(&self) -> Vec<Tensor> {
        self.m.iter().chain(&self.v).cloned().collect()
    }

    pub fn restore(&mut self, state: Vec<Tensor>, t: usize) -> Result<(), FinetuneError> {
        let n = self.vars.len();
        if state.len() != 2 * n {
            return Err(FinetuneError::Training {
                detail: "optimizer state does not match the adapter's layout".into(),
            });
        }
        let mut it = state.into_iter();
        self.m = it.by_ref().take(n).collect();
        self.v = it.collect();
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_seeded_and_starts_as_the_base_model() {
        let shape = runtime::testing::tiny_llama_shape();
        let a = LoraParams::init(&shape, &LoraModule::ALL, 4, 8.0, false, 0.0, 7).unwrap();
        let b = LoraParams::init(&shape, &LoraModule::ALL, 4, 8.0, false, 0.0, 7).unwrap();
        let c = LoraParams::init(&shape, &LoraModule::ALL, 4, 8.0, false, 0.0, 8).unwrap();
        let flat = |p: &LoraParams| {
            p.snapshot()
                .unwrap()
                .iter()
                .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(flat(&a), flat(&b));
        assert_ne!(flat(&a), flat(&c));
        assert!(a.entries.iter().all(|e| e
            .b
            .as_tensor()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            == 0.0));
        let bound = 1.0 / (shape.hidden_size as f32).sqrt();
        assert!(flat(&a).iter().all(|v| v.abs() <= bound));
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_the_learning_rate() {
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![(var.clone(), 3.0)], 0.0).unwrap();
        let g = Tensor::new(&[0.5f32, -4.0], &Device::Cpu).unwrap();
        opt.step(&[g], 0.01).unwrap();
        // Bias-corrected Adam's first update is lr·sign(g) (times the group's multiplier).
        let v = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((v[0] - (1.0 - 0.03)).abs() < 1e-5 && (v[1] - (-2.0 + 0.03)).abs() < 1e-5, "{v:?}");
    }
}
