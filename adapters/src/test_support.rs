//! Small deterministic adapters for the crate's tests.

use std::path::Path;

use crate::{write_adapter_dir, AdapterConfig, BaseModelShape, LoraModule, LoraPart, LoraTensorKey, TargetModules};

/// A two-layer llama small enough that test adapters are a few hundred bytes.
pub fn tiny_shape() -> BaseModelShape {
    BaseModelShape {
        name: "tiny-llama".to_owned(),
        num_layers: 2,
        hidden_size: 8,
        intermediate_size: 16,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
    }
}

/// Correctly shaped A/B pairs for `modules` on every layer; values depend on `seed`.
pub fn tiny_tensors(
    shape: &BaseModelShape,
    r: usize,
    modules: &[LoraModule],
    seed: u32,
) -> Vec<(LoraTensorKey, Vec<f32>, Vec<usize>)> {
    let mut out = Vec::new();
    for layer in 0..shape.num_layers {
        for &module in modules {
            for part in [LoraPart::A, LoraPart::B] {
                let key = LoraTensorKey { layer, module, part };
                let dims = shape.expected_shape(&key, r);
                let n = dims[0] * dims[1];
                let data =
                    (0..n).map(|i| ((i as u32 * 31 + seed * 7 + layer as u32) % 17) as f32 / 17.0 - 0.5).collect();
                out.push((key, data, dims.to_vec()));
            }
        }
    }
    out
}

/// Writes a valid adapter for `shape` into `dir` and returns its config.
pub fn write_tiny_adapter(
    dir: &Path,
    shape: &BaseModelShape,
    r: usize,
    modules: &[LoraModule],
    seed: u32,
) -> AdapterConfig {
    let targets = modules.iter().map(|m| m.name().to_owned()).collect();
    let config = AdapterConfig::new(r, 2.0 * r as f64, TargetModules::List(targets));
    write_adapter_dir(dir, &config, &tiny_tensors(shape, r, modules, seed)).unwrap();
    config
}
