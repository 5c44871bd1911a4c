//! Exports an adapter merged into its base model (`W + scale·BA`): an HF safetensors directory
//! and GGUF files that llama.cpp loads, plus `manifest.json` naming what was written from what.
//!
//! The merge is [`Llama::merged`], the dense reference the serving path is tested against, so
//! an export computes what Switchyard serves for base + adapter. GGUF files copy every metadata
//! entry of a GGUF base (tokenizer and chat template included) and take its Q/K rows back to
//! llama.cpp's interleaved RoPE layout; an HF directory gets Switchyard's view of the config.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use adapters::peft::CONFIG_FILE;
use adapters::{validate_adapter_dir, AdapterConfig, Limits};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::error::{Result, RuntimeError};
use crate::llama::{ChatModel, Llama, LlamaConfig};
use crate::lora::AdapterWeights;

/// The HF directory's name inside the output directory.
pub const HF_DIR: &str = "hf";
/// The manifest's name inside the output directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// One output of [`export`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportFormat {
    /// An HF llama directory ([`HF_DIR`]): `config.json`, `tokenizer.json`,
    /// `tokenizer_config.json` and f32 `model.safetensors` with HF tensor names.
    Safetensors,
    /// One GGUF file with llama.cpp's tensor names and layout, its matrices in this type (one of
    /// [`ExportFormat::GGUF_TYPES`]); norms stay f32 as llama.cpp's own converter keeps them, and
    /// a Q4_1 file keeps the embedding and head in Q8_0.
    Gguf(GgmlDType),
}

impl ExportFormat {
    /// The GGUF types an export writes: what llama.cpp and Switchyard's packed kernels both read.
    pub const GGUF_TYPES: [GgmlDType; 4] = [GgmlDType::F32, GgmlDType::F16, GgmlDType::Q8_0, GgmlDType::Q4_1];

    /// The name the CLI and the manifest use: `safetensors`, `gguf-f32`, `gguf-q8_0`, ...
    pub fn name(&self) -> String {
        match self {
            Self::Safetensors => "safetensors".to_owned(),
            Self::Gguf(t) => format!("gguf-{}", gguf_type_name(*t)),
        }
    }
}

impl std::fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::str::FromStr for ExportFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "safetensors" {
            return Ok(Self::Safetensors);
        }
        Self::GGUF_TYPES.into_iter().map(Self::Gguf).find(|f| f.name() == s).ok_or_else(|| {
            let known: Vec<String> = std::iter::once(Self::Safetensors)
                .chain(Self::GGUF_TYPES.into_iter().map(Self::Gguf))
                .map(|f| f.name())
                .collect();
            format!("unknown export format {s:?}; expected one of {}", known.join(", "))
        })
    }
}

/// One file an export wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExportedFile {
    /// The format it belongs to ([`ExportFormat::name`]).
    pub format: String,
    /// Where it is, under the output directory.
    pub path: PathBuf,
    pub sha256: String,
    pub size_bytes: u64,
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// Every file written, in the order of the formats asked for (the manifest excluded).
    pub files: Vec<ExportedFile>,
    pub manifest: PathBuf,
    /// The adapter's content hash (`adapters::content_hash`), as the registry names versions.
    pub adapter_sha256: String,
}

/// Merges the PEFT adapter in `adapter_dir` into the llama model `base` (a GGUF file or an HF
/// directory) and writes each of `formats` into `out`, plus [`MANIFEST_FILE`], which records
/// `manifest_info` (the adapter version, as the caller knows it) beside the hashes of the base,
/// the adapter and every file written. GGUF formats need a GGUF base: its tokenizer and metadata
/// are copied, not rebuilt. Files appear under their final names only once complete.
pub fn export(
    base: &Path,
    adapter_dir: &Path,
    out: &Path,
    formats: &[ExportFormat],
    manifest_info: serde_json::Value,
) -> Result<ExportReport> {
    let formats = check_inputs(base, adapter_dir, out, formats)?;
    let ChatModel { model, tokenizer, template, eos_ids } = ChatModel::load(base)?;
    let adapter_config = read_adapter_config(adapter_dir)?;
    // Shapes are what must agree; the adapter's declared base name is not compared with the
    // base's file name, which says little (renamed and re-quantized copies of one model).
    let mut shape = model.config.shape("base");
    if let Some(declared) = adapter_config.base_model_name_or_path.as_deref() {
        shape.name = declared.to_owned();
    }
    // The registry's upload limits do not apply to a local file; 1 TiB rather than u64::MAX
    // because the reader reads up to one byte past its limit.
    let unlimited = Limits { max_file_bytes: 1 << 40, max_rank: usize::MAX };
    let validated = validate_adapter_dir(adapter_dir, &shape, &unlimited)?;
    let adapter = AdapterWeights::load_peft_dir(adapter_dir, &shape, model.device())?;
    let merged = model.merged(&adapter)?;
    drop((model, adapter));
    let tensors = merged.hf_tensors()?;
    let info = BaseInfo::read(base, &tokenizer)?;

    let mut files = Vec::new();
    for format in &formats {
        match format {
            ExportFormat::Safetensors => {
                let hf = HfFiles { tokenizer: &tokenizer, info: &info, eos_ids: &eos_ids, eos: template.eos_token() };
                files.extend(write_hf_dir(out, &merged, &tensors, &hf)?);
            }
            ExportFormat::Gguf(dtype) => files.push(write_gguf(out, &merged.config, &tensors, &info, *dtype)?),
        }
    }
    let manifest = json!({
        "exporter": concat!("switchyard runtime::export ", env!("CARGO_PKG_VERSION")),
        "adapter": manifest_info,
        "adapter_dir": adapter_dir,
        "adapter_sha256": validated.sha256,
        "adapter_rank": validated.config.r,
        "adapter_alpha": validated.config.lora_alpha,
        "base": describe_base(base)?,
        "formats": formats.iter().map(ExportFormat::name).collect::<Vec<_>>(),
        "tie_word_embeddings": merged.tied(),
        "files": files.iter().map(|f| {
            let mut f = f.clone();
            f.path = f.path.strip_prefix(out).map(Path::to_path_buf).unwrap_or(f.path);
            f
        }).collect::<Vec<_>>(),
    });
    let manifest_path = out.join(MANIFEST_FILE);
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    write_atomically(&manifest_path, |tmp| std::fs::write(tmp, &bytes).map_err(|e| RuntimeError::io(tmp, e)))?;
    Ok(ExportReport { files, manifest: manifest_path, adapter_sha256: validated.sha256 })
}

/// Everything that can be checked before the (slow) merge: the formats, that the inputs exist,
/// and that `out` can be written. Returns the formats without repeats, in the order given.
fn check_inputs(base: &Path, adapter_dir: &Path, out: &Path, formats: &[ExportFormat]) -> Result<Vec<ExportFormat>> {
    let mut seen = BTreeSet::new();
    let formats: Vec<ExportFormat> = formats.iter().copied().filter(|f| seen.insert(f.name())).collect();
    if formats.is_empty() {
        return Err(RuntimeError::export(out, "no export format given"));
    }
    if !base.exists() {
        return Err(RuntimeError::export(base, "the base model does not exist"));
    }
    for f in &formats {
        if let ExportFormat::Gguf(t) = f {
            if !ExportFormat::GGUF_TYPES.contains(t) {
                return Err(RuntimeError::export(
                    out,
                    format!("GGUF type {t:?} is not exported; use F32, F16, Q8_0 or Q4_1"),
                ));
            }
            if !base.is_file() {
                return Err(RuntimeError::export(
                    base,
                    "GGUF export needs a GGUF base model (its tokenizer and metadata are copied from it); \
                     export `safetensors` and convert that directory with llama.cpp's convert_hf_to_gguf.py",
                ));
            }
        }
    }
    if !adapter_dir.is_dir() {
        return Err(RuntimeError::export(adapter_dir, "the adapter directory does not exist"));
    }
    if !adapter_dir.join(CONFIG_FILE).is_file() {
        return Err(RuntimeError::export(
            adapter_dir,
            format!("not a PEFT adapter directory: it has no {CONFIG_FILE}"),
        ));
    }
    std::fs::create_dir_all(out)
        .map_err(|e| RuntimeError::export(out, format!("the output directory cannot be created: {e}")))?;
    // A probe now rather than a failed write after minutes of merging and quantizing.
    let probe = out.join(".export-probe");
    std::fs::write(&probe, b"")
        .map_err(|e| RuntimeError::export(out, format!("the output directory cannot be written: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(formats)
}

fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(|e| RuntimeError::io(&path, e))?;
    Ok(AdapterConfig::from_json(&bytes)?)
}

/// What an export copies from the base besides its weights.
struct BaseInfo {
    /// Every metadata entry of a GGUF base.
    gguf_metadata: Option<HashMap<String, Value>>,
    chat_template: Option<String>,
    bos: Option<(u32, String)>,
    /// An HF base's `tokenizer_config.json` (empty for a GGUF base): kept apart from the fields
    /// an export sets, so nothing the base's own tokenizer class needs is lost.
    tokenizer_config: serde_json::Map<String, serde_json::Value>,
}

impl BaseInfo {
    fn read(base: &Path, tokenizer: &Tokenizer) -> Result<Self> {
        if base.is_file() {
            let mut file = File::open(base).map_err(|e| RuntimeError::io(base, e))?;
            let ct = gguf_file::Content::read(&mut file)
                .map_err(|e| RuntimeError::model(base, format!("not a readable GGUF file: {e}")))?;
            let meta = ct.metadata;
            let chat_template = meta.get("tokenizer.chat_template").and_then(|v| v.to_string().ok().cloned());
            let bos = meta
                .get("tokenizer.ggml.bos_token_id")
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| tokenizer.id_to_token(id).map(|t| (id, t)));
            return Ok(Self { gguf_metadata: Some(meta), chat_template, bos, tokenizer_config: Default::default() });
        }
        let read = |name: &str| -> serde_json::Value {
            std::fs::read(base.join(name)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
        };
        let tokenizer_config = match read("tokenizer_config.json") {
            serde_json::Value::Object(m) => m,
            _ => Default::default(),
        };
        let chat_template = tokenizer_config.get("chat_template").and_then(|v| v.as_str()).map(str::to_owned);
        let bos = read("config.json")
            .get("bos_token_id")
            .and_then(serde_json::Value::as_u64)
            .and_then(|id| tokenizer.id_to_token(id as u32).map(|t| (id as u32, t)));
        Ok(Self { gguf_metadata: None, chat_template, bos, tokenizer_config })
    }
}

/// The non-weight files of the HF directory.
struct HfFiles<'a> {
    tokenizer: &'a Tokenizer,
    info: &'a BaseInfo,
    eos_ids: &'a [u32],
    eos: &'a str,
}

/// Writes [`HF_DIR`]: what `ChatModel::load` and transformers' `LlamaForCausalLM` both read.
fn write_hf_dir(out: &Path, model: &Llama, tensors: &[(String, Tensor)], f: &HfFiles<'_>) -> Result<Vec<ExportedFile>> {
    let dir = out.join(HF_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::io(&dir, e))?;
    let cfg = &model.config;
    // Every id that ends a turn for Switchyard, so a reload stops where serving stops.
    let eos_ids = match f.eos_ids {
        [one] => json!(one),
        many => json!(many),
    };
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": shortest(cfg.rms_eps),
        "rope_theta": shortest(cfg.rope_theta),
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position,
        "tie_word_embeddings": model.tied(),
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": f.info.bos.as_ref().map(|(id, _)| *id),
        "eos_token_id": eos_ids,
        "torch_dtype": "float32",
    });
    let mut tok_cfg = f.info.tokenizer_config.clone();
    let mut set = |k: &str, v: serde_json::Value| {
        tok_cfg.entry(k.to_owned()).or_insert(v);
    };
    if let Some(t) = &f.info.chat_template {
        set("chat_template", json!(t));
    }
    if let Some((_, bos)) = &f.info.bos {
        set("bos_token", json!(bos));
    }
    if !f.eos.is_empty() {
        set("eos_token", json!(f.eos));
    }
    set("tokenizer_class", json!("PreTrainedTokenizerFast"));
    set("model_max_length", json!(cfg.max_position));
    set("clean_up_tokenization_spaces", json!(false));
    let tokenizer_json =
        f.tokenizer.to_string(false).map_err(|e| RuntimeError::export(&dir, format!("tokenizer.json: {e}")))?;

    let mut written = Vec::new();
    let text_files = [
        ("config.json", serde_json::to_string_pretty(&config).unwrap_or_default()),
        ("tokenizer.json", tokenizer_json),
        ("tokenizer_config.json", serde_json::to_string_pretty(&tok_cfg).unwrap_or_default()),
    ];
    for (name, text) in text_files {
        let path = dir.join(name);
        written.push(write_atomically(&path, |tmp| std::fs::write(tmp, &text).map_err(|e| RuntimeError::io(tmp, e)))?);
    }
    let weights = dir.join("model.safetensors");
    // transformers refuses a safetensors file whose header does not say which framework wrote it.
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    written.push(write_atomically(&weights, |tmp| {
        safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta), tmp)
            .map_err(|e| RuntimeError::export(tmp, format!("writing safetensors: {e}")))
    })?);
    for f in &mut written {
        f.format = ExportFormat::Safetensors.name();
    }
    Ok(written)
}

/// Writes one GGUF file: the base's metadata with `general.file_type` set to `dtype`'s, and
/// every merged weight under llama.cpp's name and row order.
fn write_gguf(
    out: &Path,
    cfg: &LlamaConfig,
    tensors: &[(String, Tensor)],
    info: &BaseInfo,
    dtype: GgmlDType,
) -> Result<ExportedFile> {
    let path = out.join(format!("model-{}.gguf", gguf_type_name(dtype)));
    let base_meta = info.gguf_metadata.as_ref().ok_or_else(|| RuntimeError::export(&path, "the base is not a GGUF"))?;
    let mut quantized = Vec::with_capacity(tensors.len());
    for (hf, t) in tensors {
        let (name, heads) =
            gguf_name(hf, cfg).ok_or_else(|| RuntimeError::export(&path, format!("no GGUF name for tensor {hf}")))?;
        let t = match heads {
            Some(h) => to_interleaved_rows(t, h)?,
            None => t.clone(),
        };
        let target = tensor_type(&name, t.rank(), dtype);
        let qt = QTensor::quantize(&t, target).map_err(|e| {
            RuntimeError::export(&path, format!("tensor {name} {:?} cannot be stored as {target:?}: {e}", t.dims()))
        })?;
        quantized.push((name, qt));
    }
    // candle's writer aligns tensor data to 32 bytes whatever the metadata says, so a base's own
    // alignment is not copied; the file type is the export's.
    let mut meta: Vec<(&str, Value)> = base_meta
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "general.alignment" | "general.file_type"))
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    meta.push(("general.file_type", Value::U32(llama_file_type(dtype))));
    // Sorted, architecture first (as llama.cpp writes it), so that one export hashes the same twice.
    meta.sort_by(|a, b| (a.0 != "general.architecture", a.0).cmp(&(b.0 != "general.architecture", b.0)));
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = quantized.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = write_atomically(&path, |tmp| {
        let mut w = BufWriter::new(File::create(tmp).map_err(|e| RuntimeError::io(tmp, e))?);
        gguf_file::write(&mut w, &meta_refs, &tensor_refs)
            .map_err(|e| RuntimeError::export(tmp, format!("writing GGUF: {e}")))?;
        w.flush().map_err(|e| RuntimeError::io(tmp, e))
    })?;
    file.format = ExportFormat::Gguf(dtype).name();
    Ok(file)
}

/// The llama.cpp name of an HF llama tensor, and for Q and K the head count their rows are
/// interleaved over.
fn gguf_name(hf: &str, cfg: &LlamaConfig) -> Option<(String, Option<usize>)> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some((name.to_owned(), None));
    }
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let (suffix, heads) = match rest {
        "input_layernorm.weight" => ("attn_norm", None),
        "post_attention_layernorm.weight" => ("ffn_norm", None),
        "self_attn.q_proj.weight" => ("attn_q", Some(cfg.num_heads)),
        "self_attn.k_proj.weight" => ("attn_k", Some(cfg.num_kv_heads)),
        "self_attn.v_proj.weight" => ("attn_v", None),
        "self_attn.o_proj.weight" => ("attn_output", None),
        "mlp.gate_proj.weight" => ("ffn_gate", None),
        "mlp.up_proj.weight" => ("ffn_up", None),
        "mlp.down_proj.weight" => ("ffn_down", None),
        _ => return None,
    };
    Some((format!("blk.{layer}.{suffix}.weight"), heads))
}

/// Reorders the rows of a Q or K weight `[heads·hd, in]` from the HF rotate-half layout to
/// llama.cpp's interleaved one, head by head: the inverse of the GGUF loader's `unpermute_rows`
/// (and what llama.cpp's `convert_hf_to_gguf.py` does): HF row `s·hd/2 + i` of a head becomes
/// its row `2i + s`.
fn to_interleaved_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if heads == 0 || !out.is_multiple_of(heads) || !(out / heads).is_multiple_of(2) {
        return Err(RuntimeError::export("model", format!("{out} rows do not split into {heads} heads of even size")));
    }
    let hd = out / heads;
    Ok(w.reshape((heads, 2, hd / 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// The type a tensor is stored in: norms in f32, and with 4-bit exports the embedding and the
/// head in Q8_0, as llama.cpp's quantizer keeps its output matrix above 4 bits: the head's
/// rounding reaches the logits undamped (SmolLM2's base file does the same).
fn tensor_type(name: &str, rank: usize, dtype: GgmlDType) -> GgmlDType {
    match (rank, name, dtype) {
        (1, _, _) => GgmlDType::F32,
        (_, "token_embd.weight" | "output.weight", GgmlDType::Q4_1) => GgmlDType::Q8_0,
        _ => dtype,
    }
}

/// `general.file_type` as llama.cpp numbers it (`LLAMA_FTYPE_ALL_F32`, `MOSTLY_F16`, ...).
fn llama_file_type(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F16 => 1,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        _ => 0,
    }
}

fn gguf_type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q4_1 => "q4_1",
        _ => "unsupported",
    }
}

/// An f32 setting (GGUF stores them as f32) as the shortest decimal that reads back to the same
/// f32, so `config.json` says `1e-05`, not `9.999999747378752e-06`.
fn shortest(x: f64) -> f64 {
    (x as f32).to_string().parse().unwrap_or(x)
}

/// Writes `path` through `write(tmp)` into a hidden sibling, then renames it into place, so a
/// failed or interrupted export never leaves a truncated file under the final name.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<ExportedFile> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial"));
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| RuntimeError::io(path, e))?;
    let (sha256, size_bytes) = hash_file(path)?;
    Ok(ExportedFile { format: String::new(), path: path.to_owned(), sha256, size_bytes })
}

/// The sha256 (hex) and size of a file, read in 1 MiB pieces.
fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut file = File::open(path).map_err(|e| RuntimeError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| RuntimeError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((format!("{:x}", hasher.finalize()), size))
}

/// The base as the manifest names it: a GGUF file's hash, or each model file of an HF directory.
fn describe_base(base: &Path) -> Result<serde_json::Value> {
    if base.is_file() {
        let (sha256, size_bytes) = hash_file(base)?;
        return Ok(json!({ "path": base, "sha256": sha256, "size_bytes": size_bytes }));
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(base)
        .map_err(|e| RuntimeError::io(base, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors" || x == "json"))
        .collect();
    names.sort();
    let mut files = Vec::with_capacity(names.len());
    for p in names {
        let (sha256, size_bytes) = hash_file(&p)?;
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        files.push(json!({ "path": name, "sha256": sha256, "size_bytes": size_bytes }));
    }
    Ok(json!({ "path": base, "files": files }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn formats_round_trip_through_their_names() {
        for f in std::iter::once(ExportFormat::Safetensors).chain(ExportFormat::GGUF_TYPES.map(ExportFormat::Gguf)) {
            assert_eq!(f.name().parse::<ExportFormat>(), Ok(f));
        }
        assert_eq!("gguf-q8_0".parse::<ExportFormat>(), Ok(ExportFormat::Gguf(GgmlDType::Q8_0)));
        let err = "gguf-q4_k".parse::<ExportFormat>().unwrap_err();
        assert!(err.contains("gguf-q4_1"), "{err}");
    }

    /// One head of 4 rows: HF rows (re, re, im, im) become llama.cpp's (re, im, re, im).
    #[test]
    fn q_rows_interleave_per_head() {
        let w = Tensor::from_vec((0..16).map(|v| v as f32).collect::<Vec<_>>(), (8, 2), &Device::Cpu).unwrap();
        let rows: Vec<f32> =
            to_interleaved_rows(&w, 2).unwrap().to_vec2::<f32>().unwrap().iter().map(|r| r[0]).collect();
        assert_eq!(rows, vec![0., 4., 2., 6., 8., 12., 10., 14.]);
        assert_eq!(to_interleaved_rows(&w, 3).unwrap_err().code(), "export_error");
    }

    #[test]
    fn settings_are_written_as_their_f32_values() {
        assert_eq!(shortest(f64::from(1e-5f32)), 1e-5);
        assert_eq!(shortest(100000.0), 100000.0);
    }

    #[test]
    fn every_llama_tensor_has_a_gguf_name() {
        let cfg = LlamaConfig {
            vocab_size: 8,
            hidden_size: 4,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
            rms_eps: 1e-5,
            rope_theta: 1e4,
            max_position: 16,
        };
        assert_eq!(
            gguf_name("model.layers.0.self_attn.k_proj.weight", &cfg),
            Some(("blk.0.attn_k.weight".into(), Some(1)))
        );
        assert_eq!(gguf_name("lm_head.weight", &cfg), Some(("output.weight".into(), None)));
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight", &cfg),
            Some(("blk.0.ffn_down.weight".into(), None))
        );
        assert_eq!(gguf_name("model.layers.0.rotary_emb.inv_freq", &cfg), None);
    }
}
