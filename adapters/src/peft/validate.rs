//! Checks that an adapter's files describe LoRA pairs that fit the served base model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::files::MAX_CONFIG_BYTES;
use super::{
    content_hash_bytes, AdapterConfig, AdapterFiles, BaseModelShape, LoraModule, LoraPart, LoraTensorKey, CONFIG_FILE,
    WEIGHTS_FILE,
};
use crate::error::{AdapterError, Result};

/// Upper bounds on what the gateway accepts, set from its configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest accepted `adapter_model.safetensors` (the config has a fixed 1 MiB cap).
    pub max_file_bytes: u64,
    /// Largest accepted LoRA rank `r`.
    pub max_rank: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_file_bytes: 512 << 20, max_rank: 256 }
    }
}

/// What validation learned about an adapter; everything the registry's manifest needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedAdapter {
    pub config: AdapterConfig,
    /// [`super::content_hash`] of the validated bytes.
    pub sha256: String,
    /// Both files together.
    pub size_bytes: u64,
    /// Modules that carry at least one A/B pair, in block order.
    pub modules: Vec<LoraModule>,
    /// Layers that carry at least one A/B pair, ascending.
    pub layers: Vec<usize>,
    /// Number of complete A/B pairs.
    pub pairs: usize,
}

/// Reads and validates the adapter in `dir` against `shape` and `limits`.
pub fn validate_adapter_dir(dir: &Path, shape: &BaseModelShape, limits: &Limits) -> Result<ValidatedAdapter> {
    let files = AdapterFiles::read(dir, limits)?;
    validate_adapter_bytes(&files.config, &files.weights, shape, limits)
}

/// Validates adapter file contents already in memory (uploads, or files read once by the
/// registry so that the checked bytes are the stored bytes).
pub fn validate_adapter_bytes(
    config_json: &[u8],
    weights: &[u8],
    shape: &BaseModelShape,
    limits: &Limits,
) -> Result<ValidatedAdapter> {
    let config_limit = limits.max_file_bytes.min(MAX_CONFIG_BYTES);
    for (file, len, limit) in [
        (CONFIG_FILE, config_json.len() as u64, config_limit),
        (WEIGHTS_FILE, weights.len() as u64, limits.max_file_bytes),
    ] {
        if len > limit {
            return Err(AdapterError::TooLarge { what: format!("{file} (bytes)"), actual: len, limit });
        }
    }
    let config = AdapterConfig::from_json(config_json)?;
    if config.r > limits.max_rank {
        return Err(AdapterError::TooLarge {
            what: "LoRA rank r".to_owned(),
            actual: config.r as u64,
            limit: limits.max_rank as u64,
        });
    }
    if let Some(declared) = config.base_model_name_or_path.as_deref().map(str::trim) {
        if !declared.is_empty() && !base_matches(declared, &shape.name) {
            return Err(AdapterError::BaseMismatch { adapter_base: declared.to_owned(), served: shape.name.clone() });
        }
    }

    let tensors = SafeTensors::deserialize(weights)
        .map_err(|e| AdapterError::invalid(format!("{WEIGHTS_FILE} is not a valid safetensors file: {e}")))?;
    // Value: the name the tensor had in the file, for messages about its missing partner.
    let mut seen: BTreeMap<LoraTensorKey, String> = BTreeMap::new();
    // Sorted by name so that the first problem reported is the same on every run.
    let mut entries: Vec<_> = tensors.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for (name, view) in entries {
        let key = LoraTensorKey::parse(name).ok_or_else(|| {
            AdapterError::invalid(format!(
                "tensor {name} is not a LoRA weight of a known llama module \
                 (expected e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)"
            ))
        })?;
        if key.layer >= shape.num_layers {
            return Err(AdapterError::invalid(format!(
                "tensor {name} is for layer {}, but {} has {} layers",
                key.layer, shape.name, shape.num_layers
            )));
        }
        if !config.target_modules.matches(key.module) {
            return Err(AdapterError::invalid(format!(
                "tensor {name} adapts {}, which is not in target_modules {}",
                key.module,
                config.target_modules.describe()
            )));
        }
        check_dtype_and_values(name, view.dtype(), view.data())?;
        let expected = shape.expected_shape(&key, config.r);
        let (in_f, out_f) = shape.dims(key.module);
        if view.shape() != expected {
            return Err(AdapterError::invalid(format!(
                "tensor {name} has shape {:?}, expected {expected:?} ({} {} maps {in_f} -> {out_f} features, r = {})",
                view.shape(),
                shape.name,
                key.module,
                config.r,
            )));
        }
        if let Some(first) = seen.insert(key, name.to_owned()) {
            return Err(AdapterError::invalid(format!("tensors {first} and {name} are the same weight")));
        }
    }

    for (key, name) in &seen {
        if !seen.contains_key(&key.partner()) {
            return Err(AdapterError::invalid(format!("tensor {name} has no matching {}", key.partner().peft_name())));
        }
    }
    if seen.is_empty() {
        return Err(AdapterError::invalid(format!("{WEIGHTS_FILE} contains no LoRA tensors")));
    }

    let pairs: Vec<&LoraTensorKey> = seen.keys().filter(|k| k.part == LoraPart::A).collect();
    let modules: BTreeSet<LoraModule> = pairs.iter().map(|k| k.module).collect();
    let layers: BTreeSet<usize> = pairs.iter().map(|k| k.layer).collect();
    Ok(ValidatedAdapter {
        sha256: content_hash_bytes(config_json, weights),
        size_bytes: (config_json.len() + weights.len()) as u64,
        modules: modules.into_iter().collect(),
        layers: layers.into_iter().collect(),
        pairs: pairs.len(),
        config,
    })
}

/// Whether an adapter's declared base model is the served one. Compares the last path
/// component case-insensitively and also accepts either containing the other, so
/// `HuggingFaceTB/SmolLM2-135M` matches `SmolLM2-135M-Instruct`; nothing looser.
pub fn base_matches(declared: &str, served: &str) -> bool {
    fn last(s: &str) -> String {
        s.trim().trim_end_matches(['/', '\\']).rsplit(['/', '\\']).next().unwrap_or_default().to_ascii_lowercase()
    }
    let (a, b) = (last(declared), last(served));
    if a.is_empty() || b.is_empty() {
        return false;
    }
    a == b || a.contains(&b) || b.contains(&a)
}

/// Only float types serving can upcast, and no NaN/inf: one bad value would poison every
/// token generated through this adapter.
fn check_dtype_and_values(name: &str, dtype: Dtype, data: &[u8]) -> Result<()> {
    let finite = match dtype {
        Dtype::F32 => data.chunks_exact(4).all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        // An all-ones exponent field means inf or NaN in both 16-bit formats.
        Dtype::F16 => data.chunks_exact(2).all(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 != 0x7c00),
        Dtype::BF16 => data.chunks_exact(2).all(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 != 0x7f80),
        other => {
            return Err(AdapterError::invalid(format!("tensor {name} has dtype {other:?}, expected F32, F16 or BF16")))
        }
    };
    if finite {
        Ok(())
    } else {
        Err(AdapterError::invalid(format!("tensor {name} contains NaN or infinite values")))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::fs;

    use safetensors::tensor::TensorView;

    use super::*;
    use crate::peft::write_adapter_dir;
    use crate::test_support::{tiny_shape, tiny_tensors, write_tiny_adapter};
    use crate::TargetModules;

    fn key(layer: usize, module: LoraModule, part: LoraPart) -> LoraTensorKey {
        LoraTensorKey { layer, module, part }
    }

    fn expect_invalid(dir: &Path, needle: &str) -> AdapterError {
        let err = validate_adapter_dir(dir, &tiny_shape(), &Limits::default()).unwrap_err();
        assert!(err.to_string().contains(needle), "error {err:?} should contain {needle:?}");
        err
    }

    #[test]
    fn written_adapter_validates() {
        let dir = tempfile::tempdir().unwrap();
        let shape = tiny_shape();
        write_tiny_adapter(dir.path(), &shape, 4, &[LoraModule::QProj, LoraModule::DownProj], 7);
        let v = validate_adapter_dir(dir.path(), &shape, &Limits::default()).unwrap();
        assert_eq!(v.config.r, 4);
        assert_eq!(v.modules, vec![LoraModule::QProj, LoraModule::DownProj]);
        assert_eq!(v.layers, vec![0, 1]);
        assert_eq!(v.pairs, 4);
        assert_eq!(v.sha256, crate::content_hash(dir.path()).unwrap());
        assert_eq!(v.config.peft_type.as_deref(), Some("LORA"));
        assert_eq!(v.config.task_type.as_deref(), Some("CAUSAL_LM"));
    }

    #[test]
    fn smollm2_adapter_validates_all_linear() {
        let dir = tempfile::tempdir().unwrap();
        let shape = BaseModelShape::smollm2_135m();
        let mut config = AdapterConfig::new(2, 4.0, TargetModules::AllLinear);
        config.base_model_name_or_path = Some("HuggingFaceTB/SmolLM2-135M-Instruct".into());
        let mut tensors = tiny_tensors(&shape, 2, &LoraModule::ALL, 3);
        tensors.retain(|(k, _, _)| k.layer == 29);
        write_adapter_dir(dir.path(), &config, &tensors).unwrap();
        let v = validate_adapter_dir(dir.path(), &shape, &Limits::default()).unwrap();
        assert_eq!(v.pairs, 7);
        assert_eq!(v.layers, vec![29]);
    }

    #[test]
    fn wrong_shape_names_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let config = AdapterConfig::new(2, 4.0, TargetModules::List(vec!["q_proj".into()]));
        let tensors = vec![
            (key(1, LoraModule::QProj, LoraPart::A), vec![0.0; 2 * 5], vec![2, 5]),
            (key(1, LoraModule::QProj, LoraPart::B), vec![0.0; 8 * 2], vec![8, 2]),
        ];
        write_adapter_dir(dir.path(), &config, &tensors).unwrap();
        let err = expect_invalid(
            dir.path(),
            "tensor base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight has shape [2, 5], expected [2, 8]",
        );
        assert_eq!(err.code(), "invalid_adapter");
    }

    #[test]
    fn rank_differing_from_config_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let shape = tiny_shape();
        let tensors = tiny_tensors(&shape, 4, &[LoraModule::VProj], 1);
        let config = AdapterConfig::new(2, 4.0, TargetModules::List(vec!["v_proj".into()]));
        write_adapter_dir(dir.path(), &config, &tensors).unwrap();
        expect_invalid(dir.path(), "has shape [4, 8], expected [2, 8]");
    }

    #[test]
    fn rank_above_limit_is_too_large() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_adapter(dir.path(), &tiny_shape(), 4, &[LoraModule::QProj], 1);
        let limits = Limits { max_rank: 2, ..Limits::default() };
        let err = validate_adapter_dir(dir.path(), &tiny_shape(), &limits).unwrap_err();
        assert_eq!(err.code(), "adapter_too_large");
    }

    #[test]
    fn unpaired_a_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let shape = tiny_shape();
        let mut tensors = tiny_tensors(&shape, 2, &[LoraModule::KProj], 1);
        tensors.retain(|(k, _, _)| !(k.layer == 1 && k.part == LoraPart::B));
        let config = AdapterConfig::new(2, 4.0, TargetModules::List(vec!["k_proj".into()]));
        write_adapter_dir(dir.path(), &config, &tensors).unwrap();
        expect_invalid(
            dir.path(),
            "tensor base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight has no matching \
             base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight",
        );
    }

    /// Writes raw named F32 tensors, bypassing the typed writer, to fake foreign files.
    fn write_raw(dir: &Path, config: &[u8], tensors: &[(&str, Vec<usize>)]) {
        let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, s)| vec![0u8; 4 * s.iter().product::<usize>()]).collect();
        let views =
            tensors.iter().zip(&bytes).map(|((n, s), b)| (*n, TensorView::new(Dtype::F32, s.clone(), b).unwrap()));
        let st = safetensors::serialize(views, None::<HashMap<String, String>>).unwrap();
        fs::write(dir.join(WEIGHTS_FILE), st).unwrap();
        fs::write(dir.join(CONFIG_FILE), config).unwrap();
    }

    #[test]
    fn unknown_module_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let config = br#"{"r": 2, "lora_alpha": 4, "target_modules": "all-linear"}"#;
        write_raw(dir.path(), config, &[("base_model.model.lm_head.lora_A.weight", vec![2, 8])]);
        expect_invalid(dir.path(), "tensor base_model.model.lm_head.lora_A.weight is not a LoRA weight");
    }

    #[test]
    fn untargeted_module_and_out_of_range_layer_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let shape = tiny_shape();
        let config = AdapterConfig::new(2, 4.0, TargetModules::List(vec!["q_proj".into()]));
        write_adapter_dir(dir.path(), &config, &tiny_tensors(&shape, 2, &[LoraModule::UpProj], 1)).unwrap();
        expect_invalid(dir.path(), "adapts up_proj, which is not in target_modules [\"q_proj\"]");

        let dir = tempfile::tempdir().unwrap();
        let config = br#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#;
        write_raw(
            dir.path(),
            config,
            &[
                ("base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight", vec![2, 8]),
                ("base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight", vec![8, 2]),
            ],
        );
        expect_invalid(dir.path(), "is for layer 2, but tiny-llama has 2 layers");
    }

    #[test]
    fn default_segment_names_validate_but_duplicates_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let config = br#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#;
        let a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight";
        let b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight";
        write_raw(dir.path(), config, &[(a, vec![2, 8]), (b, vec![8, 2])]);
        let v = validate_adapter_dir(dir.path(), &tiny_shape(), &Limits::default()).unwrap();
        assert_eq!(v.pairs, 1);

        let canonical_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        write_raw(dir.path(), config, &[(a, vec![2, 8]), (b, vec![8, 2]), (canonical_a, vec![2, 8])]);
        expect_invalid(dir.path(), "are the same weight");
    }

    #[test]
    fn base_mismatch_is_rejected_and_near_names_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let shape = tiny_shape();
        let mut config = AdapterConfig::new(2, 4.0, TargetModules::List(vec!["q_proj".into()]));
        config.base_model_name_or_path = Some("meta-llama/Llama-3.1-8B".into());
        write_adapter_dir(dir.path(), &config, &tiny_tensors(&shape, 2, &[LoraModule::QProj], 1)).unwrap();
        let err = validate_adapter_dir(dir.path(), &shape, &Limits::default()).unwrap_err();
        assert_eq!(err.code(), "base_mismatch");
        assert!(err.to_string().contains("Llama-3.1-8B"), "{err}");

        assert!(base_matches("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"));
        assert!(base_matches("/models/smollm2-135m/", "SmolLM2-135M-Instruct"));
        assert!(!base_matches("HuggingFaceTB/SmolLM2-360M-Instruct", "SmolLM2-135M-Instruct"));
        assert!(!base_matches("", "SmolLM2-135M-Instruct"));
    }

    #[test]
    fn garbage_safetensors_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_adapter(dir.path(), &tiny_shape(), 2, &[LoraModule::QProj], 1);
        fs::write(dir.path().join(WEIGHTS_FILE), b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a safetensors file").unwrap();
        let err = expect_invalid(dir.path(), "is not a valid safetensors file");
        assert_eq!(err.code(), "invalid_adapter");
    }

    #[test]
    fn empty_adapter_and_bad_dtype_and_nan_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let config = br#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#;
        write_raw(dir.path(), config, &[]);
        expect_invalid(dir.path(), "contains no LoRA tensors");

        let ints = vec![0u8; 2 * 8 * 4];
        let view = TensorView::new(Dtype::I32, vec![2, 8], &ints).unwrap();
        let name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        let st = safetensors::serialize([(name, view)], None::<HashMap<String, String>>).unwrap();
        fs::write(dir.path().join(WEIGHTS_FILE), st).unwrap();
        expect_invalid(dir.path(), "has dtype I32, expected F32, F16 or BF16");

        let shape = tiny_shape();
        let mut tensors = tiny_tensors(&shape, 2, &[LoraModule::QProj], 1);
        tensors[0].1[3] = f32::NAN;
        let cfg = AdapterConfig::new(2, 4.0, TargetModules::List(vec!["q_proj".into()]));
        write_adapter_dir(dir.path(), &cfg, &tensors).unwrap();
        expect_invalid(dir.path(), "contains NaN or infinite values");
    }

    #[test]
    fn bf16_and_f16_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let config = br#"{"r": 1, "lora_alpha": 1, "target_modules": ["o_proj"]}"#;
        let a = [0x3fu8, 0x80].repeat(8); // 8 x 1.0 in bf16 (little-endian 0x3f80)
        let b = [0x00u8, 0x3c].repeat(8); // 8 x 1.0 in f16 (little-endian 0x3c00)
        let views = [
            (
                "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight",
                TensorView::new(Dtype::BF16, vec![1, 8], &a).unwrap(),
            ),
            (
                "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight",
                TensorView::new(Dtype::F16, vec![8, 1], &b).unwrap(),
            ),
        ];
        fs::write(
            dir.path().join(WEIGHTS_FILE),
            safetensors::serialize(views, None::<HashMap<String, String>>).unwrap(),
        )
        .unwrap();
        fs::write(dir.path().join(CONFIG_FILE), config).unwrap();
        let v = validate_adapter_dir(dir.path(), &tiny_shape(), &Limits::default()).unwrap();
        assert_eq!(v.modules, vec![LoraModule::OProj]);
    }
}
