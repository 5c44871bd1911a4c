//! In-process decode-step benchmark of the candle engine's `Runtime`: no HTTP, no scheduler,
//! only `Runtime::forward` on a batch of sequences. Loads interleave (base, one adapter, eight
//! adapters, base, ...) over several rounds so that drift on a shared machine hits every load
//! alike; the report gives each load's median and its ratio to the base (and one adapter).
//!
//! `switchyard-steps --model M.gguf [--streams 1,16] [--steps 64] [--rounds 7] [--json F]`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use runtime::llama::{argmax_of as argmax, KvCache, Llama, Runtime, SeqInput, Workspace};
use runtime::lora::AdapterWeights;

#[derive(Parser, Debug)]
#[command(name = "switchyard-steps", about = "Decode steps per second of the candle engine, in process")]
struct Args {
    /// A llama GGUF (the default model).
    #[arg(long)]
    model: PathBuf,
    /// Batch sizes (concurrent sequences) to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    streams: Vec<usize>,
    /// Timed decode steps per measurement.
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// Measurements per load (interleaved).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Matmul threads (0: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// LoRA rank of the generated adapters (all seven modules, every layer).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Precision the adapters are served in: f32 or bf16.
    #[arg(long, default_value = "f32")]
    lora_dtype: runtime::lora::LoraDtype,
    /// What the decode matmuls multiply the packed weights against: f32 (exact) or q8.
    #[arg(long, default_value = "f32")]
    activations: runtime::kernels::Activations,
    /// Loads to run: base, one, eight (for profiling one of them alone).
    #[arg(long, value_delimiter = ',', default_value = "base,one,eight")]
    loads: Vec<String>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq)]
enum Load {
    Base,
    OneAdapter,
    EightAdapters,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Base => "base",
            Load::OneAdapter => "one adapter",
            Load::EightAdapters => "8 adapters",
        }
    }
}

const PROMPT: usize = 36;

/// Tokens per second of `steps` decode steps over `streams` sequences after a 36-token prompt.
fn measure(rt: &Runtime, adapters: &[&AdapterWeights], streams: usize, steps: usize) -> f64 {
    let mut caches: Vec<KvCache> = (0..streams).map(|_| KvCache::new(&rt.config, PROMPT + steps + 1)).collect();
    let mut ws = Workspace::default();
    let mut logits = Vec::new();
    let vocab = rt.config.vocab_size as u32;
    let prompts: Vec<Vec<u32>> =
        (0..streams).map(|s| (0..PROMPT as u32).map(|i| (i * 977 + s as u32 * 131 + 17) % vocab).collect()).collect();
    // Sequences on one adapter side by side, as the gateway's scheduler orders its batch.
    let adapter = |s: usize| (!adapters.is_empty()).then(|| adapters[s * adapters.len() / streams]);
    {
        let mut seqs: Vec<SeqInput<'_>> = caches
            .iter_mut()
            .zip(&prompts)
            .enumerate()
            .map(|(s, (cache, p))| SeqInput { tokens: p, cache, adapter: adapter(s), logits: true, all_logits: false })
            .collect();
        rt.forward(&mut ws, &mut seqs, &mut logits).expect("prefill");
    }
    let mut next: Vec<[u32; 1]> =
        (0..streams).map(|s| [argmax(&logits[s * vocab as usize..(s + 1) * vocab as usize])]).collect();
    let start = Instant::now();
    for _ in 0..steps {
        let mut seqs: Vec<SeqInput<'_>> = caches
            .iter_mut()
            .zip(&next)
            .enumerate()
            .map(|(s, (cache, t))| SeqInput { tokens: t, cache, adapter: adapter(s), logits: true, all_logits: false })
            .collect();
        rt.forward(&mut ws, &mut seqs, &mut logits).expect("decode step");
        for (s, t) in next.iter_mut().enumerate() {
            t[0] = argmax(&logits[s * vocab as usize..(s + 1) * vocab as usize]);
        }
    }
    (streams * steps) as f64 / start.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (llama, _, _) = Llama::from_gguf(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let mut rt = Runtime::from_llama(&llama, args.threads)?;
    rt.set_activations(args.activations);
    let shape = rt.config.shape("bench");
    drop(llama);
    let dir = tempdir()?;
    let mut owned = Vec::new();
    for i in 0..8 {
        let path = dir.join(format!("a{i}"));
        runtime::testing::write_bench_adapter(&path, &shape, args.rank, 1000 + i)?;
        owned.push(AdapterWeights::load_peft_dir_as(&path, &shape, &Device::Cpu, args.lora_dtype)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let loads: Vec<Load> = [("base", Load::Base), ("one", Load::OneAdapter), ("eight", Load::EightAdapters)]
        .into_iter()
        .filter(|(k, _)| args.loads.iter().any(|l| l == k))
        .map(|(_, l)| l)
        .collect();
    let mut rows = Vec::new();
    println!(
        "Runtime::forward, {} threads, {:?} kernels, {:?} activations, rank-{} adapters on all modules served in {:?}; {} steps x {} rounds (median)\n",
        rt.threads(),
        runtime::kernels::isa(),
        args.activations,
        args.rank,
        args.lora_dtype,
        args.steps,
        args.rounds
    );
    println!("| streams | load | tok/s (median) | min | max | ratio | paired ratio |");
    println!("|---:|---|---:|---:|---:|---|---:|");
    for &streams in &args.streams {
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); loads.len()];
        // One untimed pass per load warms caches and the allocator.
        for round in 0..=args.rounds {
            for (li, &load) in loads.iter().enumerate() {
                let ads: Vec<&AdapterWeights> = match load {
                    Load::Base => Vec::new(),
                    Load::OneAdapter => vec![&owned[0]],
                    Load::EightAdapters => owned.iter().collect(),
                };
                let tps = measure(&rt, &ads, streams, args.steps);
                if round > 0 {
                    samples[li].push(tps);
                }
            }
        }
        // Each round's ratio to the load it is compared with, measured moments apart: on a
        // machine whose speed drifts, their median is steadier than a ratio of medians.
        let paired = |li: usize, against: Load| -> Option<f64> {
            let bi = loads.iter().position(|&x| x == against)?;
            let mut r: Vec<f64> = samples[li].iter().zip(&samples[bi]).map(|(a, b)| a / b).collect();
            Some(median(&mut r))
        };
        let pairs: Vec<Option<f64>> = loads
            .iter()
            .enumerate()
            .map(|(li, &load)| match load {
                Load::Base => None,
                Load::OneAdapter => paired(li, Load::Base),
                Load::EightAdapters => paired(li, Load::OneAdapter),
            })
            .collect();
        let meds: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
        let med = |l: Load| loads.iter().position(|&x| x == l).map(|i| meds[i]);
        for (li, &load) in loads.iter().enumerate() {
            let s = &samples[li];
            let ratio = match (load, med(Load::Base), med(Load::OneAdapter)) {
                (Load::OneAdapter, Some(base), _) => format!("{:.3} of base", meds[li] / base),
                (Load::EightAdapters, _, Some(one)) => format!("{:.3} of one adapter", meds[li] / one),
                _ => String::new(),
            };
            let pair = pairs[li].map(|p| format!("{p:.3}")).unwrap_or_default();
            println!(
                "| {streams} | {} | {:.1} | {:.1} | {:.1} | {ratio} | {pair} |",
                load.name(),
                meds[li],
                s[0],
                s[s.len() - 1]
            );
            rows.push(serde_json::json!({
                "streams": streams, "load": load.name(), "tok_s_median": meds[li], "paired_ratio": pairs[li], "samples": s,
            }));
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("switchyard-steps-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
