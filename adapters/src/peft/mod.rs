//! The PEFT LoRA on-disk format: `adapter_config.json` plus `adapter_model.safetensors`.

mod files;
mod names;
mod validate;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::error::{AdapterError, Result};

pub use files::{
    content_hash, content_hash_bytes, ensure_within, write_adapter_dir, AdapterFiles, CONFIG_FILE, WEIGHTS_FILE,
};
pub use names::{BaseModelShape, LoraModule, LoraPart, LoraTensorKey};
pub use validate::{base_matches, validate_adapter_bytes, validate_adapter_dir, Limits, ValidatedAdapter};

/// The fields of `adapter_config.json` that serving needs; everything else PEFT writes is
/// kept in `extra` so a round trip through this type loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// LoRA rank: the inner dimension of every A/B pair.
    pub r: usize,
    /// Numerator of the scale applied to `B·A`.
    pub lora_alpha: f64,
    /// Which linear modules carry LoRA weights.
    pub target_modules: TargetModules,
    /// Training-time dropout; irrelevant to inference but checked for sanity.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Rank-stabilised scaling: `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// The base model the adapter was trained on, as a hub id or a local path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
    /// Must be `"LORA"` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peft_type: Option<String>,
    /// Usually `"CAUSAL_LM"`; not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    /// Every other field PEFT wrote (revision, fan_in_fan_out, inference_mode, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// `target_modules` as PEFT writes it: an explicit list or the `"all-linear"` shorthand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// Module names (`"q_proj"`) or dotted suffixes (`"self_attn.q_proj"`).
    List(Vec<String>),
    /// Every linear layer except the output head.
    AllLinear,
}

impl AdapterConfig {
    /// A config as our own writer emits it: `peft_type` LORA, `task_type` CAUSAL_LM.
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> Self {
        Self {
            r,
            lora_alpha,
            target_modules,
            lora_dropout: 0.0,
            use_rslora: false,
            base_model_name_or_path: None,
            peft_type: Some("LORA".to_owned()),
            task_type: Some("CAUSAL_LM".to_owned()),
            extra: serde_json::Map::new(),
        }
    }

    /// The factor applied to `B·A x`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        let r = self.r as f64;
        if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }
    }

    /// Parses `adapter_config.json` bytes, naming the file in the error.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let config: Self =
            serde_json::from_slice(bytes).map_err(|e| AdapterError::invalid(format!("{CONFIG_FILE}: {e}")))?;
        config.check()?;
        Ok(config)
    }

    /// Rejects values no served adapter can have, and PEFT features we do not implement
    /// (per-module ranks, DoRA) rather than serving them wrongly.
    pub fn check(&self) -> Result<()> {
        let bad = |field: &str, why: String| Err(AdapterError::invalid(format!("{CONFIG_FILE}: {field} {why}")));
        if self.r == 0 {
            return bad("r", "must be at least 1".into());
        }
        if !self.lora_alpha.is_finite() || self.lora_alpha <= 0.0 {
            return bad("lora_alpha", format!("must be a positive number, got {}", self.lora_alpha));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad("lora_dropout", format!("must be in [0, 1), got {}", self.lora_dropout));
        }
        if let Some(t) = self.peft_type.as_deref() {
            if t != "LORA" {
                return bad("peft_type", format!("must be \"LORA\", got {t:?}"));
            }
        }
        if let TargetModules::List(list) = &self.target_modules {
            if list.is_empty() {
                return bad("target_modules", "is empty".into());
            }
        }
        for field in ["rank_pattern", "alpha_pattern"] {
            if let Some(v) = self.extra.get(field) {
                let empty = v.is_null() || v.as_object().is_some_and(|m| m.is_empty());
                if !empty {
                    return bad(field, "is not supported (every module must use rank r and lora_alpha)".into());
                }
            }
        }
        if self.extra.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return bad("use_dora", "is not supported".into());
        }
        Ok(())
    }
}

impl TargetModules {
    /// Whether this target list covers `module`, using PEFT's rule: exact name or a
    /// dotted suffix of the module's path.
    pub fn matches(&self, module: LoraModule) -> bool {
        match self {
            Self::AllLinear => true,
            Self::List(list) => list
                .iter()
                .any(|t| t == module.name() || t.strip_suffix(module.name()).is_some_and(|head| head.ends_with('.'))),
        }
    }

    /// Human-readable form for error messages.
    pub fn describe(&self) -> String {
        match self {
            Self::AllLinear => "\"all-linear\"".to_owned(),
            Self::List(list) => format!("{list:?}"),
        }
    }
}

impl Serialize for TargetModules {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::AllLinear => s.serialize_str("all-linear"),
            Self::List(list) => list.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let expected = "must be a list of module names or \"all-linear\"";
        match Value::deserialize(d)? {
            Value::String(s) if s == "all-linear" => Ok(Self::AllLinear),
            Value::String(s) => {
                Err(D::Error::custom(format!("target_modules {expected}; regex patterns like {s:?} are not supported")))
            }
            Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s),
                    other => Err(D::Error::custom(format!("target_modules {expected}, found {other}"))),
                })
                .collect::<std::result::Result<Vec<_>, _>>()
                .map(Self::List),
            other => Err(D::Error::custom(format!("target_modules {expected}, got {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keeps_unknown_fields_and_parses_peft_output() {
        let json = br#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
            "lora_dropout": 0.05, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "fan_in_fan_out": false,
            "revision": null, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": false}"#;
        let c = AdapterConfig::from_json(json).unwrap();
        assert_eq!(c.r, 8);
        assert_eq!(c.scale(), 2.0);
        assert_eq!(c.extra.get("fan_in_fan_out"), Some(&Value::Bool(false)));
        let back: AdapterConfig = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn all_linear_and_rslora_scale() {
        let json = br#"{"r": 16, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": true}"#;
        let c = AdapterConfig::from_json(json).unwrap();
        assert_eq!(c.target_modules, TargetModules::AllLinear);
        assert_eq!(c.scale(), 2.0);
        assert!(c.target_modules.matches(LoraModule::DownProj));
        assert_eq!(serde_json::to_value(&c.target_modules).unwrap(), Value::from("all-linear"));
    }

    #[test]
    fn target_suffix_matching_follows_peft() {
        let t = TargetModules::List(vec!["self_attn.q_proj".into(), "up_proj".into()]);
        assert!(t.matches(LoraModule::QProj));
        assert!(t.matches(LoraModule::UpProj));
        assert!(!t.matches(LoraModule::KProj));
        // "xq_proj" must not match "q_proj": only whole dotted components count.
        assert!(!TargetModules::List(vec!["xq_proj".into()]).matches(LoraModule::QProj));
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases: [(&[u8], &str); 6] = [
            (br#"{"r": 0, "lora_alpha": 8, "target_modules": ["q_proj"]}"#, "r must be at least 1"),
            (br#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "IA3"}"#, "peft_type"),
            (br#"{"r": 4, "lora_alpha": 8, "target_modules": ".*q_proj"}"#, "regex"),
            (br#"{"r": 4, "lora_alpha": 8}"#, "target_modules"),
            (
                br#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": 2}}"#,
                "rank_pattern",
            ),
            (br#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": true}"#, "use_dora"),
        ];
        for (json, needle) in cases {
            let err = AdapterConfig::from_json(json).unwrap_err();
            assert_eq!(err.code(), "invalid_adapter");
            assert!(err.to_string().contains(needle), "{err} should mention {needle}");
        }
    }
}
