//! PEFT tensor names for llama-family models and the base-model shapes they must fit.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Prefix PEFT puts in front of every llama decoder-layer weight.
const LAYER_PREFIX: &str = "base_model.model.model.layers.";

/// The seven linear layers of a llama decoder block that LoRA may wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraModule {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

/// Which half of a LoRA pair: A is `[r, in]`, B is `[out, r]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraPart {
    A,
    B,
}

/// One tensor of a PEFT adapter, identified by where it sits in the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LoraTensorKey {
    pub layer: usize,
    pub module: LoraModule,
    pub part: LoraPart,
}

/// The dimensions of the base model an adapter must fit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModelShape {
    /// Short model name, compared against the adapter's `base_model_name_or_path`.
    pub name: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl LoraModule {
    /// All seven, in the order they appear in a decoder block.
    pub const ALL: [Self; 7] =
        [Self::QProj, Self::KProj, Self::VProj, Self::OProj, Self::GateProj, Self::UpProj, Self::DownProj];

    /// The module's name in checkpoints, e.g. `q_proj`.
    pub fn name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
        }
    }

    /// The block the module lives in: `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            Self::QProj | Self::KProj | Self::VProj | Self::OProj => "self_attn",
            Self::GateProj | Self::UpProj | Self::DownProj => "mlp",
        }
    }

    /// The inverse of [`LoraModule::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

impl fmt::Display for LoraModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl LoraPart {
    /// `lora_A` or `lora_B`, as in the tensor name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::A => "lora_A",
            Self::B => "lora_B",
        }
    }
}

impl LoraTensorKey {
    /// Parses a PEFT tensor name. Accepts the canonical `...lora_A.weight` and the
    /// `...lora_A.default.weight` form that PEFT writes when the adapter name is kept.
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(LAYER_PREFIX)?;
        let (layer, rest) = rest.split_once('.')?;
        if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let layer = layer.parse().ok()?;
        let parts: Vec<&str> = rest.split('.').collect();
        let (parent, module, lora) = match parts.as_slice() {
            [parent, module, lora, "weight"] | [parent, module, lora, "default", "weight"] => (*parent, *module, *lora),
            _ => return None,
        };
        let module = LoraModule::from_name(module)?;
        if module.parent() != parent {
            return None;
        }
        let part = match lora {
            "lora_A" => LoraPart::A,
            "lora_B" => LoraPart::B,
            _ => return None,
        };
        Some(Self { layer, module, part })
    }

    /// The canonical PEFT name, without the adapter-name segment.
    pub fn peft_name(&self) -> String {
        format!(
            "{LAYER_PREFIX}{}.{}.{}.{}.weight",
            self.layer,
            self.module.parent(),
            self.module.name(),
            self.part.as_str()
        )
    }

    /// The other half of this pair.
    pub fn partner(&self) -> Self {
        let part = match self.part {
            LoraPart::A => LoraPart::B,
            LoraPart::B => LoraPart::A,
        };
        Self { part, ..*self }
    }
}

impl fmt::Display for LoraTensorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.peft_name())
    }
}

impl BaseModelShape {
    /// HuggingFaceTB/SmolLM2-135M-Instruct, the gateway's default base model.
    pub fn smollm2_135m() -> Self {
        Self {
            name: "SmolLM2-135M-Instruct".to_owned(),
            num_layers: 30,
            hidden_size: 576,
            intermediate_size: 1536,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
        }
    }

    /// `(in_features, out_features)` of a module given by its checkpoint name.
    pub fn module_dims(&self, module: &str) -> Option<(usize, usize)> {
        LoraModule::from_name(module).map(|m| self.dims(m))
    }

    /// `(in_features, out_features)` of a module.
    pub fn dims(&self, module: LoraModule) -> (usize, usize) {
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        match module {
            LoraModule::QProj => (self.hidden_size, q),
            LoraModule::KProj | LoraModule::VProj => (self.hidden_size, kv),
            LoraModule::OProj => (q, self.hidden_size),
            LoraModule::GateProj | LoraModule::UpProj => (self.hidden_size, self.intermediate_size),
            LoraModule::DownProj => (self.intermediate_size, self.hidden_size),
        }
    }

    /// The shape PEFT gives this tensor at rank `r`: A is `[r, in]`, B is `[out, r]`.
    pub fn expected_shape(&self, key: &LoraTensorKey, r: usize) -> [usize; 2] {
        let (inp, out) = self.dims(key.module);
        match key.part {
            LoraPart::A => [r, inp],
            LoraPart::B => [out, r],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_for_every_module() {
        for module in LoraModule::ALL {
            for part in [LoraPart::A, LoraPart::B] {
                let key = LoraTensorKey { layer: 17, module, part };
                assert_eq!(LoraTensorKey::parse(&key.peft_name()), Some(key));
            }
        }
        assert_eq!(
            LoraTensorKey { layer: 3, module: LoraModule::QProj, part: LoraPart::A }.peft_name(),
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
        );
    }

    #[test]
    fn default_adapter_segment_is_normalised() {
        let key = LoraTensorKey::parse("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight").unwrap();
        assert_eq!(key.peft_name(), "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight");
    }

    #[test]
    fn foreign_names_are_rejected() {
        for name in [
            "base_model.model.model.layers.0.self_attn.q_proj.weight",
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.+1.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.other.weight",
            "base_model.model.lm_head.lora_A.weight",
            "model.layers.0.self_attn.q_proj.lora_A.weight",
        ] {
            assert_eq!(LoraTensorKey::parse(name), None, "{name}");
        }
    }

    #[test]
    fn smollm2_dims() {
        let s = BaseModelShape::smollm2_135m();
        assert_eq!(s.module_dims("q_proj"), Some((576, 576)));
        assert_eq!(s.module_dims("k_proj"), Some((576, 192)));
        assert_eq!(s.module_dims("o_proj"), Some((576, 576)));
        assert_eq!(s.module_dims("gate_proj"), Some((576, 1536)));
        assert_eq!(s.module_dims("down_proj"), Some((1536, 576)));
        assert_eq!(s.module_dims("lm_head"), None);
        let key = LoraTensorKey { layer: 0, module: LoraModule::VProj, part: LoraPart::B };
        assert_eq!(s.expected_shape(&key, 8), [192, 8]);
    }
}
