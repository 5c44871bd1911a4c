//! `switchyard-load`: drives a running gateway with streaming chat requests at several
//! concurrency levels and reports time to first token, inter-token latency and tokens/s.
//!
//! Traffic goes only to the URL given, which should be a loopback address.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(about = "Load generator for the Switchyard gateway")]
struct Args {
    /// Base URL of the gateway.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Model (or adapter) name to request.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Concurrency levels to run, one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Requests each stream sends in a row at every level.
    #[arg(long, default_value_t = 2)]
    requests_per_stream: usize,
    /// Tokens generated per request (end-of-sequence is ignored so every request is equal).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// The user message.
    #[arg(long, default_value = "Write a short story about a lighthouse keeper who finds a message in a bottle.")]
    prompt: String,
    /// Where to write the markdown report (stdout always gets it too).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Where to write the JSON report.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// What one streamed request measured.
#[derive(Debug, Clone)]
struct Sample {
    ttft: Duration,
    gaps: Vec<Duration>,
    completion_tokens: usize,
    decode_time: Duration,
}

#[derive(Debug, Serialize)]
struct Level {
    concurrency: usize,
    requests: usize,
    failures: usize,
    wall_s: f64,
    aggregate_tok_s: f64,
    per_stream_decode_tok_s_mean: f64,
    ttft_ms_p50: f64,
    ttft_ms_p99: f64,
    itl_ms_p50: f64,
    itl_ms_p99: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    url: String,
    model: String,
    max_tokens: usize,
    prompt_tokens: usize,
    levels: Vec<Level>,
}

async fn one_request(client: &reqwest::Client, args: &Args) -> Result<(Sample, usize)> {
    let body = json!({
        "model": args.model,
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let started = Instant::now();
    let res = client.post(format!("{}/v1/chat/completions", args.url)).json(&body).send().await?;
    if !res.status().is_success() {
        bail!("status {}: {}", res.status(), res.text().await.unwrap_or_default());
    }
    let mut stream = res.bytes_stream();
    let mut buf = String::new();
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut gaps = Vec::new();
    let mut usage: Option<Value> = None;
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let Some(data) = frame.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).context("chunk is not JSON")?;
            if v.get("error").is_some() {
                bail!("stream error: {data}");
            }
            if !v["usage"].is_null() {
                usage = Some(v["usage"].clone());
            }
            let has_text = v["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty());
            if has_text {
                let now = Instant::now();
                match last {
                    None => first = Some(now),
                    Some(prev) => gaps.push(now - prev),
                }
                last = Some(now);
            }
        }
    }
    let usage = usage.context("no usage chunk")?;
    let first = first.context("no text streamed")?;
    let last = last.unwrap_or(first);
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap_or(0) as usize;
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0) as usize;
    Ok((Sample { ttft: first - started, gaps, completion_tokens, decode_time: last - first }, prompt_tokens))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn run_level(client: &reqwest::Client, args: &Args, concurrency: usize) -> (Level, usize) {
    let started = Instant::now();
    let streams = (0..concurrency).map(|_| async {
        let mut out = Vec::new();
        for _ in 0..args.requests_per_stream {
            out.push(one_request(client, args).await);
        }
        out
    });
    let results: Vec<_> = futures::future::join_all(streams).await.into_iter().flatten().collect();
    let wall = started.elapsed();
    let mut failures = 0;
    let mut samples = Vec::new();
    let mut prompt_tokens = 0;
    for r in results {
        match r {
            Ok((s, p)) => {
                samples.push(s);
                prompt_tokens = p;
            }
            Err(e) => {
                failures += 1;
                eprintln!("request failed: {e:#}");
            }
        }
    }
    let total_tokens: usize = samples.iter().map(|s| s.completion_tokens).sum();
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft.as_secs_f64() * 1e3).collect();
    let mut itl: Vec<f64> = samples.iter().flat_map(|s| s.gaps.iter().map(|g| g.as_secs_f64() * 1e3)).collect();
    ttft.sort_by(f64::total_cmp);
    itl.sort_by(f64::total_cmp);
    let decode: Vec<f64> = samples
        .iter()
        .filter(|s| s.decode_time > Duration::ZERO)
        .map(|s| (s.completion_tokens.saturating_sub(1)) as f64 / s.decode_time.as_secs_f64())
        .collect();
    let level = Level {
        concurrency,
        requests: samples.len() + failures,
        failures,
        wall_s: wall.as_secs_f64(),
        aggregate_tok_s: total_tokens as f64 / wall.as_secs_f64(),
        per_stream_decode_tok_s_mean: decode.iter().sum::<f64>() / decode.len().max(1) as f64,
        ttft_ms_p50: percentile(&ttft, 0.5),
        ttft_ms_p99: percentile(&ttft, 0.99),
        itl_ms_p50: percentile(&itl, 0.5),
        itl_ms_p99: percentile(&itl, 0.99),
    };
    (level, prompt_tokens)
}

fn markdown(r: &Report) -> String {
    let mut s = format!(
        "Model `{}` at {}, {} generated tokens per request (EOS ignored), {}-token prompt.\n\n",
        r.model, r.url, r.max_tokens, r.prompt_tokens
    );
    s.push_str("| streams | requests | failed | aggregate tok/s | per-stream decode tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |\n");
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for l in &r.levels {
        s.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} |\n",
            l.concurrency, l.requests, l.failures, l.aggregate_tok_s, l.per_stream_decode_tok_s_mean,
            l.ttft_ms_p50, l.ttft_ms_p99, l.itl_ms_p50, l.itl_ms_p99
        ));
    }
    s
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(1800)).build()?;
    let ready = client.get(format!("{}/ready", args.url)).send().await.context("gateway unreachable")?;
    if !ready.status().is_success() {
        bail!("gateway at {} is not ready ({})", args.url, ready.status());
    }
    // One untimed request warms caches and the allocator.
    one_request(&client, &args).await.context("warm-up request failed")?;
    let mut levels = Vec::new();
    let mut prompt_tokens = 0;
    for &c in &args.concurrency {
        eprintln!("running {c} concurrent stream(s)...");
        let (level, p) = run_level(&client, &args, c).await;
        prompt_tokens = p;
        levels.push(level);
    }
    let report = Report { url: args.url.clone(), model: args.model.clone(), max_tokens: args.max_tokens, prompt_tokens, levels };
    let md = markdown(&report);
    println!("{md}");
    if let Some(path) = &args.out {
        std::fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    if report.levels.iter().any(|l| l.failures > 0) {
        bail!("some requests failed");
    }
    Ok(())
}
