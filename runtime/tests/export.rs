//! `runtime::export` on the real SmolLM2 GGUF: the merged f32 GGUF and HF directory decode what
//! the adapter decodes on the base, the F16, Q8_0 and Q4_1 files stay close to it, the manifest
//! names what was written, and bad inputs end in error codes, not panics.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use runtime::export::{export, ExportFormat, ExportReport, HF_DIR, MANIFEST_FILE};
use runtime::llama::{argmax_of as argmax, ChatModel, KvCache, Llama, Row, Runtime, SeqCache, SeqInput, Workspace};
use runtime::lora::AdapterWeights;
use runtime::testing::{tiny_llama_shape, write_bench_adapter, write_random_adapter, write_tiny_llama, CHAT_PROMPTS};
use sha2::{Digest, Sha256};

/// Greedy tokens generated per prompt.
const STEPS: usize = 16;

fn model_path() -> PathBuf {
    let path = std::env::var_os("SWITCHYARD_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(path.is_file(), "{} is missing: run scripts/fetch-models.sh first", path.display());
    path
}

/// One prompt's greedy decode: the tokens and the logits each was picked from.
struct Decode {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

/// Greedy decoding through the candle model (the dense reference path).
fn decode_candle(model: &Llama, adapter: Option<&AdapterWeights>, ids: &[u32]) -> Decode {
    let mut cache = SeqCache::new(model.config.num_layers);
    let (mut input, mut out) = (ids.to_vec(), Decode { tokens: Vec::new(), logits: Vec::new() });
    for _ in 0..STEPS {
        let t = Tensor::new(input.as_slice(), model.device()).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward_cached(&t, &[Row { adapter }], &mut [&mut cache], true).unwrap();
        let logits = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let next = argmax(&logits);
        out.tokens.push(next);
        out.logits.push(logits);
        input = vec![next];
    }
    out
}

/// Greedy decoding through the packed serving runtime, as the engine runs it.
fn decode_served(rt: &Runtime, adapter: Option<&AdapterWeights>, ids: &[u32]) -> Decode {
    let mut cache = KvCache::new(&rt.config, ids.len() + STEPS + 1);
    let mut ws = Workspace::default();
    let (mut input, mut out) = (ids.to_vec(), Decode { tokens: Vec::new(), logits: Vec::new() });
    for _ in 0..STEPS {
        let mut logits = Vec::new();
        let seq = SeqInput { tokens: &input, cache: &mut cache, adapter, logits: true, all_logits: false };
        rt.forward(&mut ws, &mut [seq], &mut logits).unwrap();
        let next = argmax(&logits);
        out.tokens.push(next);
        out.logits.push(logits);
        input = vec![next];
    }
    out
}

/// How closely one set of decodes follows the reference.
#[derive(Debug)]
struct Agreement {
    /// Positions (of 20 × 16) holding the reference's token.
    tokens: f64,
    /// Prompts whose first generated token is the reference's.
    first: f64,
    /// Largest logit difference at the prompt's final position.
    first_logits: f32,
    /// Largest logit difference over every step whose history equals the reference's.
    shared_logits: f32,
}

fn agreement(reference: &[Decode], got: &[Decode]) -> Agreement {
    let (mut equal, mut first, mut first_logits, mut shared_logits) = (0usize, 0usize, 0f32, 0f32);
    for (r, g) in reference.iter().zip(got) {
        equal += r.tokens.iter().zip(&g.tokens).filter(|(a, b)| a == b).count();
        first += usize::from(r.tokens[0] == g.tokens[0]);
        let same_history = r.tokens.iter().zip(&g.tokens).take_while(|(a, b)| a == b).count();
        for k in 0..(same_history + 1).min(STEPS) {
            let d = r.logits[k].iter().zip(&g.logits[k]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            shared_logits = shared_logits.max(d);
            if k == 0 {
                first_logits = first_logits.max(d);
            }
        }
    }
    let n = reference.len();
    Agreement { tokens: equal as f64 / (n * STEPS) as f64, first: first as f64 / n as f64, first_logits, shared_logits }
}

fn sha256(path: &Path) -> String {
    let mut bytes = Vec::new();
    std::fs::File::open(path).unwrap().read_to_end(&mut bytes).unwrap();
    format!("{:x}", Sha256::digest(&bytes))
}

fn gguf_content(path: &Path) -> Content {
    Content::read(&mut std::fs::File::open(path).unwrap()).unwrap()
}

/// Every base metadata entry is in the export unchanged, the file type is the export's, norms
/// stay f32 (and a Q4_1 file's embedding Q8_0), and the head is tied exactly when the base's was.
fn check_gguf_file(base: &Content, path: &Path, dtype: GgmlDType, file_type: u32) {
    let ct = gguf_content(path);
    for (k, v) in &base.metadata {
        if k != "general.file_type" && k != "general.alignment" {
            let got = ct.metadata.get(k).map(|g| format!("{g:?}"));
            assert_eq!(got, Some(format!("{v:?}")), "{}: metadata {k}", path.display());
        }
    }
    assert_eq!(ct.metadata["general.file_type"].to_u32().unwrap(), file_type);
    assert_eq!(ct.tensor_infos.len(), base.tensor_infos.len(), "same tensors as the base");
    assert_eq!(ct.tensor_infos.contains_key("output.weight"), base.tensor_infos.contains_key("output.weight"));
    for (name, info) in &ct.tensor_infos {
        let want = match name.as_str() {
            n if n.ends_with("norm.weight") => GgmlDType::F32,
            "token_embd.weight" | "output.weight" if dtype == GgmlDType::Q4_1 => GgmlDType::Q8_0,
            _ => dtype,
        };
        assert_eq!(info.ggml_dtype, want, "{name}");
        assert_eq!(info.shape, base.tensor_infos[name].shape, "{name}");
    }
}

#[test]
fn exports_decode_like_the_adapter_on_the_base() {
    let base_path = model_path();
    let tmp = tempfile::tempdir().unwrap();
    let adapter_dir = tmp.path().join("adapter");
    let base = ChatModel::load(&base_path).unwrap();
    let shape = base.model.config.shape("SmolLM2-135M-Instruct");
    // Rank 8 on every module at a trained adapter's magnitudes: it changes about half of the
    // greedy tokens below and keeps the answers fluent (B at ±0.03 already makes them babble).
    write_bench_adapter(&adapter_dir, &shape, 8, 7).unwrap();
    let adapter = AdapterWeights::load_peft_dir(&adapter_dir, &shape, &Device::Cpu).unwrap();

    let out = tmp.path().join("out");
    let formats: Vec<ExportFormat> =
        ["safetensors", "gguf-f32", "gguf-f16", "gguf-q8_0", "gguf-q4_1"].iter().map(|f| f.parse().unwrap()).collect();
    let info = serde_json::json!({"name": "export-test", "version": 3});
    let report = export(&base_path, &adapter_dir, &out, &formats, info.clone()).unwrap();
    check_manifest(&report, &out, &base_path, &info);
    let base_ct = gguf_content(&base_path);
    for (dtype, file_type) in [(GgmlDType::F32, 0), (GgmlDType::F16, 1), (GgmlDType::Q8_0, 7), (GgmlDType::Q4_1, 3)] {
        let name = format!("model-{}.gguf", ExportFormat::Gguf(dtype).name().trim_start_matches("gguf-"));
        check_gguf_file(&base_ct, &out.join(name), dtype, file_type);
    }

    let prompts: Vec<Vec<u32>> = CHAT_PROMPTS
        .iter()
        .map(|p| {
            let text = base.template.render([("user", *p)]).unwrap();
            base.tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec()
        })
        .collect();
    // The reference: the base as loaded (Q4_1) with the adapter, through the serving runtime as
    // the engine runs it (packed kernels, f32 activations, the LoRA delta beside the matmul).
    let served = Runtime::from_llama(&base.model, 0).unwrap();
    let reference: Vec<Decode> = prompts.iter().map(|p| decode_served(&served, Some(&adapter), p)).collect();
    let measure = |what: &str, decodes: Vec<Decode>| {
        let a = agreement(&reference, &decodes);
        eprintln!(
            "{what}: tokens equal {:.3} ({} x {STEPS}), first token {:.2}, max |logit diff| at the prompt's end {:.2e}, over shared history {:.2e}",
            a.tokens,
            prompts.len(),
            a.first,
            a.first_logits,
            a.shared_logits
        );
        a
    };
    let without =
        measure("base without the adapter", prompts.iter().map(|p| decode_served(&served, None, p)).collect());
    assert!(without.tokens < 0.8, "the adapter must change greedy output for this test to mean anything");
    drop(served);
    // The candle reference path on dense weights, LoRA applied beside the matmul (not merged):
    // the same sums in another order.
    let dense = base.model.to_dense().unwrap();
    let a = measure(
        "dense candle path + adapter",
        prompts.iter().map(|p| decode_candle(&dense, Some(&adapter), p)).collect(),
    );
    assert!(a.tokens == 1.0 && a.shared_logits <= 1e-3, "the served path is the dense reference up to rounding");
    drop(dense);

    for (what, path) in [("merged f32 GGUF", out.join("model-f32.gguf")), ("merged HF directory", out.join(HF_DIR))] {
        let exported = ChatModel::load(&path).unwrap();
        assert_eq!(exported.eos_ids, base.eos_ids, "{what}");
        let text = exported.template.render([("user", CHAT_PROMPTS[0])]).unwrap();
        assert_eq!(text, base.template.render([("user", CHAT_PROMPTS[0])]).unwrap(), "{what}: chat template");
        let ids = exported.tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(ids, prompts[0], "{what}: tokenizer");
        assert_eq!(exported.model.tied(), base.model.tied(), "{what}");
        let a = measure(what, prompts.iter().map(|p| decode_candle(&exported.model, None, p)).collect());
        assert_eq!(a.tokens, 1.0, "{what}: every greedy token is the adapter's");
        assert!(a.shared_logits <= 1e-3, "{what}: logits differ by {}", a.shared_logits);
    }
    // Floors well under what was measured (F16 0.97, Q8_0 0.78, Q4_1 0.81 of the tokens; every
    // first token): free-running decodes part for good at the first near-tie a rounding flips.
    for (what, file, floor) in [
        ("merged F16 GGUF (served)", "model-f16.gguf", 0.9),
        ("merged Q8_0 GGUF (served)", "model-q8_0.gguf", 0.7),
        ("merged Q4_1 GGUF (served)", "model-q4_1.gguf", 0.6),
    ] {
        let exported = ChatModel::load(&out.join(file)).unwrap();
        let rt = Runtime::from_llama(&exported.model, 0).unwrap();
        let a = measure(what, prompts.iter().map(|p| decode_served(&rt, None, p)).collect());
        assert!(a.tokens >= floor, "{what}: token agreement {} below {floor}", a.tokens);
        assert!(a.first >= 0.9, "{what}: first-token agreement {}", a.first);
    }
}

/// The manifest names the adapter version it was given, the adapter's and the base's hashes,
/// and every file written with its true hash and size.
fn check_manifest(report: &ExportReport, out: &Path, base: &Path, info: &serde_json::Value) {
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(&manifest["adapter"], info);
    assert_eq!(manifest["adapter_sha256"], report.adapter_sha256.as_str());
    assert_eq!(manifest["base"]["sha256"], sha256(base).as_str());
    assert_eq!(
        manifest["formats"],
        serde_json::json!(["safetensors", "gguf-f32", "gguf-f16", "gguf-q8_0", "gguf-q4_1"])
    );
    let files = manifest["files"].as_array().unwrap();
    let names: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "hf/config.json",
            "hf/tokenizer.json",
            "hf/tokenizer_config.json",
            "hf/model.safetensors",
            "model-f32.gguf",
            "model-f16.gguf",
            "model-q8_0.gguf",
            "model-q4_1.gguf"
        ]
    );
    for f in files {
        let path = out.join(f["path"].as_str().unwrap());
        assert_eq!(f["sha256"], sha256(&path).as_str(), "{}", path.display());
        assert_eq!(f["size_bytes"], std::fs::metadata(&path).unwrap().len(), "{}", path.display());
    }
    let hf_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("hf/config.json")).unwrap()).unwrap();
    assert_eq!(hf_config["architectures"], serde_json::json!(["LlamaForCausalLM"]));
    assert_eq!(hf_config["torch_dtype"], "float32");
    assert_eq!(hf_config["num_key_value_heads"], 3);
    let tok_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("hf/tokenizer_config.json")).unwrap()).unwrap();
    assert!(tok_config["chat_template"].as_str().is_some_and(|t| t.contains("<|im_start|>")));
    assert_eq!(tok_config["eos_token"], "<|im_end|>");
    let leftovers: Vec<_> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let base = model_path();
    let tmp = tempfile::tempdir().unwrap();
    let f16 = [ExportFormat::Gguf(GgmlDType::F16)];
    let code = |base: &Path, adapter: &Path, out: &Path, formats: &[ExportFormat]| {
        export(base, adapter, out, formats, serde_json::Value::Null).map(|_| ()).unwrap_err().code()
    };
    let out = tmp.path().join("out");
    assert_eq!(code(&base, &tmp.path().join("missing"), &out, &f16), "export_error");
    assert!(!out.exists(), "nothing is written for an export that cannot start");
    let tiny_adapter = tmp.path().join("tiny-adapter");
    write_random_adapter(&tiny_adapter, &tiny_llama_shape(), 4, 1, false).unwrap();
    assert_eq!(code(&tmp.path().join("missing.gguf"), &tiny_adapter, &out, &f16), "export_error");
    assert_eq!(code(&base, &tiny_adapter, &out, &[]), "export_error");
    // An output "directory" below a plain file cannot be created (root ignores permissions).
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    assert_eq!(code(&base, &tiny_adapter, &file.join("out"), &f16), "export_error");
    // An adapter trained for another shape is the adapter format's error.
    assert_eq!(code(&base, &tiny_adapter, &out, &f16), "invalid_adapter");
    let bad_type = [ExportFormat::Gguf(GgmlDType::Q4K)];
    assert_eq!(code(&base, &tiny_adapter, &tmp.path().join("out2"), &bad_type), "export_error");
}

/// An HF base exports an HF directory that reloads to exactly base + adapter; GGUF from an HF
/// base is refused (the tokenizer metadata would have to be rebuilt, not copied).
#[test]
fn an_hf_base_exports_a_directory_that_reloads_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (base_dir, adapter_dir, out) = (tmp.path().join("base"), tmp.path().join("adapter"), tmp.path().join("out"));
    let shape = write_tiny_llama(&base_dir, 11).unwrap();
    write_random_adapter(&adapter_dir, &shape, 4, 12, false).unwrap();
    let gguf = [ExportFormat::Gguf(GgmlDType::F32)];
    let err = export(&base_dir, &adapter_dir, &out, &gguf, serde_json::Value::Null).unwrap_err();
    assert_eq!(err.code(), "export_error", "{err}");
    assert!(err.to_string().contains("GGUF base"), "{err}");

    let report =
        export(&base_dir, &adapter_dir, &out, &[ExportFormat::Safetensors], serde_json::json!({"v": 1})).unwrap();
    assert_eq!(report.files.len(), 4);
    let base = ChatModel::load(&base_dir).unwrap();
    let exported = ChatModel::load(&out.join(HF_DIR)).unwrap();
    assert!(!exported.model.tied());
    assert_eq!(exported.eos_ids, base.eos_ids);
    let text = base.template.render([("user", "the cat sat on the mat")]).unwrap();
    assert_eq!(exported.template.render([("user", "the cat sat on the mat")]).unwrap(), text);
    let ids = base.tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    assert_eq!(exported.tokenizer.encode(text.as_str(), false).unwrap().get_ids(), ids.as_slice());
    let adapter = AdapterWeights::load_peft_dir(&adapter_dir, &shape, &Device::Cpu).unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let want = base.model.forward_full(&input, Some(&adapter)).unwrap();
    let got = exported.model.forward_full(&input, None).unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let diff = (want - got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff <= 1e-5 * scale.max(1.0), "logits differ by {diff} (largest {scale})");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(MANIFEST_FILE)).unwrap()).unwrap();
    let base_files: Vec<&str> =
        manifest["base"]["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(base_files, ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]);
}
