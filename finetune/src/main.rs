//! The `finetune` binary: `finetune train` for one-off jobs, `finetune watch`, the sidecar, and
//! `finetune export`, an adapter merged into its base for llama.cpp and transformers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use finetune::error::FinetuneError;
use finetune::job::{self, CurateArgs, JobInput, Source};
use protocol::params::TrainArgs;

#[derive(Parser)]
#[command(
    name = "finetune",
    version,
    about = "Switchyard's LoRA training: datasets and feedback into adapter versions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train one adapter from a dataset file (alpaca, sharegpt, messages, preference or KTO;
    /// JSON or JSONL, detected) and write a PEFT adapter directory plus its report into --out.
    Train(TrainCmd),
    /// Run as the sidecar: watch feedback, queue jobs when enough accepted records exist, run
    /// queued jobs (also those started through the gateway's admin API) and register results.
    Watch(WatchCmd),
    /// Merge a PEFT adapter into its base model and write it as an HF safetensors directory
    /// and/or GGUF files (llama.cpp's layout; the base's tokenizer and chat template copied),
    /// plus manifest.json with the hashes of everything read and written.
    Export(ExportCmd),
}

#[derive(clap::Args)]
struct ExportCmd {
    /// The base model: a GGUF file (any format) or an HF directory (safetensors only).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    base: PathBuf,
    /// The PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory: hf/ for safetensors, model-<type>.gguf per GGUF format, manifest.json.
    #[arg(long)]
    out: PathBuf,
    /// safetensors, gguf-f32, gguf-f16, gguf-q8_0 or gguf-q4_1; repeat for several.
    #[arg(long = "format", default_values = ["safetensors", "gguf-f16"])]
    formats: Vec<runtime::export::ExportFormat>,
    /// The adapter's registry name, recorded in the manifest.
    #[arg(long)]
    adapter_name: Option<String>,
    /// The adapter's registry version, recorded in the manifest.
    #[arg(long)]
    adapter_version: Option<u64>,
}

#[derive(clap::Args)]
struct TrainCmd {
    /// The base model: a GGUF file or an HF directory.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    base: PathBuf,
    /// The dataset file.
    #[arg(long)]
    dataset: PathBuf,
    /// Output directory: adapter/, report.json, report.md, train_log.jsonl, metrics.json,
    /// lineage.json and checkpoints/ (a rerun with the same settings resumes from them).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    curate: CurateArgs,
    /// Start from this PEFT adapter (e.g. DPO after SFT) instead of a fresh one.
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// Also evaluate this PEFT adapter (the version serving today) on the held-out split.
    #[arg(long)]
    compare_adapter: Option<PathBuf>,
    /// Register the result as a new version (alias `candidate`) through the gateway.
    #[arg(long)]
    register: bool,
    /// Adapter name to register under.
    #[arg(long, required_if_eq("register", "true"))]
    adapter_name: Option<String>,
    /// The gateway whose admin API registers versions.
    #[arg(long, env = "SWITCHYARD_GATEWAY_URL", default_value = "http://127.0.0.1:8080")]
    gateway: String,
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Promote the candidate to `prod` when it beats the compared version by this margin.
    #[arg(long)]
    promote_margin: Option<f64>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct WatchCmd {
    /// The gateway's data directory (feedback, registry, job queue).
    #[arg(long, env = "SWITCHYARD_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    #[arg(long, env = "SWITCHYARD_MODEL")]
    base: PathBuf,
    #[arg(long, env = "SWITCHYARD_GATEWAY_URL", default_value = "http://127.0.0.1:8080")]
    gateway: String,
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// Read feedback from the Redis stream (consumer group `finetune`) instead of the files.
    #[arg(long, env = "SWITCHYARD_REDIS_URL")]
    redis_url: Option<String>,
    /// The adapter feedback-triggered jobs train.
    #[arg(long)]
    adapter: String,
    /// Only feedback on answers of this model string (`name`, `name@7`, or `` for the base).
    #[arg(long)]
    feedback_from: Option<String>,
    /// Only feedback on answers of one application endpoint (`classify`, `qa`, `generate`,
    /// `recommend`), or `chat` for chat and text completions: an adapter per task.
    #[arg(long)]
    feedback_task: Option<String>,
    /// Accepted feedback records not yet trained on that start a job.
    #[arg(long, default_value_t = 20)]
    min_new_records: usize,
    #[arg(long, default_value_t = 5)]
    poll_seconds: u64,
    #[arg(long)]
    promote_margin: Option<f64>,
    /// Exit once nothing is left to do instead of watching forever.
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    curate: CurateArgs,
}

/// Keeps freed tensor buffers in the heap: candle allocates every op's output afresh, and with
/// glibc's defaults each buffer over 128 KiB is a new mmap whose pages fault in zeroed, which
/// was a tenth of a training step.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    keep_freed_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Export(cmd) => return export(cmd),
        Command::Train(cmd) => train(cmd),
        Command::Watch(cmd) => finetune::sidecar::run(&finetune::sidecar::SidecarConfig {
            data_dir: cmd.data_dir,
            base: cmd.base,
            gateway: cmd.gateway,
            admin_token: cmd.admin_token,
            redis_url: cmd.redis_url,
            adapter: cmd.adapter,
            feedback_from: cmd.feedback_from,
            feedback_task: cmd.feedback_task,
            min_new_records: cmd.min_new_records,
            poll: Duration::from_secs(cmd.poll_seconds.max(1)),
            promote_margin: cmd.promote_margin,
            args: cmd.train,
            curate: cmd.curate,
            once: cmd.once,
            progress: true,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("finetune: error [{}]: {e}", e.code());
            if let FinetuneError::NothingLeft { .. } | FinetuneError::TooFewExamples { .. } = &e {
                eprintln!("finetune: the curation report is in the --out directory (report.md, report.json)");
            }
            ExitCode::FAILURE
        }
    }
}

/// `finetune export`: the flags into [`runtime::export::export`], and what it wrote onto stdout.
fn export(cmd: ExportCmd) -> ExitCode {
    let info = serde_json::json!({
        "path": cmd.adapter,
        "name": cmd.adapter_name,
        "version": cmd.adapter_version,
    });
    match runtime::export::export(&cmd.base, &cmd.adapter, &cmd.out, &cmd.formats, info) {
        Ok(report) => {
            for f in &report.files {
                println!("wrote {} ({}, {} bytes, sha256 {})", f.path.display(), f.format, f.size_bytes, f.sha256);
            }
            println!("wrote {} (adapter sha256 {})", report.manifest.display(), report.adapter_sha256);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("finetune: error [{}]: {e}", e.code());
            ExitCode::FAILURE
        }
    }
}

fn train(cmd: TrainCmd) -> Result<(), FinetuneError> {
    let job_id = protocol::jobs::new_job_id();
    let gateway = match (cmd.register, &cmd.admin_token) {
        (true, Some(token)) => Some(finetune::register::Gateway::new(&cmd.gateway, token)?),
        (true, None) => {
            return Err(FinetuneError::Config {
                detail: "--register needs --admin-token (or SWITCHYARD_ADMIN_TOKEN)".into(),
            })
        }
        (false, _) => None,
    };
    let name = cmd.adapter_name.clone().unwrap_or_default();
    let prod_at_start = match &gateway {
        Some(g) => g.alias(&name, adapters::registry::DEFAULT_ALIAS)?,
        None => None,
    };
    let input = JobInput {
        job_id: job_id.clone(),
        base: cmd.base,
        source: Source::File(cmd.dataset),
        out: cmd.out.clone(),
        args: cmd.train,
        curate: cmd.curate,
        init_adapter: cmd.init_adapter,
        compare: cmd.compare_adapter.map(|d| ("prod".to_owned(), d)),
        progress: !cmd.quiet,
    };
    let result = job::run(input, &|| false)?;
    println!("adapter written to {}", result.adapter_dir.display());
    if let Some(g) = gateway {
        let registered = g.register(&name, &result, &job_id, cmd.promote_margin, prod_at_start)?;
        println!(
            "registered {name}@{} as candidate{} ({})",
            registered.version,
            if registered.promoted {
                " and promoted it to prod"
            } else if registered.released {
                " and started its release on prod"
            } else {
                ""
            },
            registered.decision
        );
    }
    Ok(())
}
