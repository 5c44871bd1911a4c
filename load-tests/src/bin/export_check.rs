//! Switchyard's side of the llama.cpp export check (`export-llamacpp.sh`): writes a test adapter,
//! then greedy-decodes fixed chat prompts on the serving runtime, with the adapter and without,
//! and writes the prompt ids and generated ids as JSON for llama.cpp to be compared with.
//!
//! `switchyard-export-check --base M.gguf --adapter DIR [--make-adapter] [--tokens 16] --json F`

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use runtime::llama::{argmax_of, ChatModel, KvCache, Runtime, SeqInput, Workspace};
use runtime::lora::AdapterWeights;
use runtime::testing::CHAT_PROMPTS;

#[derive(Parser, Debug)]
#[command(name = "switchyard-export-check", about = "Switchyard's greedy ids for the llama.cpp export check")]
struct Args {
    /// The base model (a llama GGUF or an HF directory).
    #[arg(long)]
    base: PathBuf,
    /// The PEFT adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// First write a rank-8 adapter on every module into --adapter, at a trained adapter's
    /// magnitudes (it changes about half of SmolLM2's greedy tokens and keeps them fluent).
    #[arg(long)]
    make_adapter: bool,
    /// Greedy tokens per prompt (end of sequence ignored, as on the llama.cpp side).
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Matmul threads (0: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long)]
    json: PathBuf,
}

/// Greedy ids on the serving runtime, as the candle engine decodes them.
fn greedy(rt: &Runtime, adapter: Option<&AdapterWeights>, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut cache = KvCache::new(&rt.config, prompt.len() + n + 1);
    let mut ws = Workspace::default();
    let (mut input, mut out, mut logits) = (prompt.to_vec(), Vec::with_capacity(n), Vec::new());
    for _ in 0..n {
        let seq = SeqInput { tokens: &input, cache: &mut cache, adapter, logits: true, all_logits: false };
        rt.forward(&mut ws, &mut [seq], &mut logits)?;
        let next = argmax_of(&logits);
        out.push(next);
        input = vec![next];
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let model = ChatModel::load(&args.base).with_context(|| format!("loading {}", args.base.display()))?;
    let shape = model.model.config.shape("SmolLM2-135M-Instruct");
    if args.make_adapter {
        runtime::testing::write_bench_adapter(&args.adapter, &shape, 8, 22)?;
    }
    // f32 LoRA halves: the exact served result (the gateway's default, bf16, rounds them).
    let adapter = AdapterWeights::load_peft_dir(&args.adapter, &shape, &Device::Cpu)?;
    let rt = Runtime::from_llama(&model.model, args.threads)?;
    let mut prompts = Vec::with_capacity(CHAT_PROMPTS.len());
    for p in CHAT_PROMPTS {
        let text = model.template.render([("user", p)]).map_err(anyhow::Error::msg)?;
        let ids = model.tokenizer.encode(text.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
        prompts.push(serde_json::json!({
            "prompt": p,
            "prompt_ids": ids,
            "adapter_ids": greedy(&rt, Some(&adapter), &ids, args.tokens)?,
            "base_ids": greedy(&rt, None, &ids, args.tokens)?,
        }));
    }
    let report = serde_json::json!({"tokens": args.tokens, "lora_dtype": "f32", "prompts": prompts});
    std::fs::write(&args.json, serde_json::to_vec_pretty(&report)?)?;
    println!("{}", args.json.display());
    Ok(())
}
