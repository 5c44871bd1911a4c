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
    /// Model or adapter names to request; stream i uses the (i mod n)-th.
    #[arg(long = "model", alias = "models", value_delimiter = ',', default_value = "smollm2-135m-instruct")]
    models: Vec<String>,
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
    /// Send --prompt as raw text to /v1/completions (so another engine can be given exactly the
    /// same tokens) instead of as a chat message.
    #[arg(long)]
    completions: bool,
    /// Where to write the markdown report (stdout always gets it too).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Where to write the JSON report.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Bearer token for the admin API (needed by --flip-adapter and --adapter-timings).
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// During every level, move this adapter's `prod` alias back and forth between
    /// --flip-versions (a promote, then a rollback, ...) while the streams run.
    #[arg(long)]
    flip_adapter: Option<String>,
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    flip_versions: Vec<u64>,
    /// How many alias moves per level.
    #[arg(long, default_value_t = 100)]
    flips: usize,
    /// Before the levels: time a cold and a warm request to each version of this adapter, and
    /// how long after a promote the first answer from the promoted version starts.
    #[arg(long)]
    adapter_timings: Option<String>,
    /// Write this many random rank-8 PEFT adapters for SmolLM2-135M (a0, a1, ...) into
    /// --make-adapters and exit.
    #[arg(long)]
    make_adapters: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 8)]
    adapter_count: usize,
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
    alias_moves: usize,
    alias_move_failures: usize,
    requests: usize,
    failures: usize,
    wall_s: f64,
    aggregate_tok_s: f64,
    per_stream_decode_tok_s_mean: f64,
    /// The slowest stream's decode rate: no stream starves while others run.
    per_stream_decode_tok_s_min: f64,
    ttft_ms_p50: f64,
    ttft_ms_p99: f64,
    itl_ms_p50: f64,
    itl_ms_p99: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    url: String,
    models: Vec<String>,
    adapter_timings: Option<AdapterTimings>,
    max_tokens: usize,
    prompt_tokens: usize,
    levels: Vec<Level>,
}

async fn one_request(client: &reqwest::Client, args: &Args, model: &str) -> Result<(Sample, usize)> {
    let mut body = json!({
        "model": model,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let route = if args.completions {
        body["prompt"] = json!(args.prompt);
        "completions"
    } else {
        body["messages"] = json!([{"role": "user", "content": args.prompt}]);
        "chat/completions"
    };
    let started = Instant::now();
    let res = client.post(format!("{}/v1/{route}", args.url)).json(&body).send().await?;
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
            let choice = &v["choices"][0];
            let text = choice["delta"]["content"].as_str().or_else(|| choice["text"].as_str());
            let has_text = text.is_some_and(|t| !t.is_empty());
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

#[derive(Debug, Serialize)]
struct AdapterTimings {
    adapter: String,
    cold_ttft_ms: f64,
    warm_ttft_ms: f64,
    promote_to_first_token_ms: f64,
}

fn admin_request(
    client: &reqwest::Client,
    args: &Args,
    method: reqwest::Method,
    path: &str,
) -> Result<reqwest::RequestBuilder> {
    let token = args.admin_token.as_deref().context("this needs --admin-token")?;
    Ok(client.request(method, format!("{}{path}", args.url)).bearer_auth(token))
}

/// Moves `prod` of --flip-adapter between --flip-versions until --flips moves or the load ends;
/// returns (moves, failed moves).
async fn flip_aliases(client: &reqwest::Client, args: &Args, done: &std::sync::atomic::AtomicBool) -> (usize, usize) {
    let Some(name) = &args.flip_adapter else { return (0, 0) };
    let (mut moves, mut failures) = (0, 0);
    while moves < args.flips && !done.load(std::sync::atomic::Ordering::Relaxed) {
        let target = args.flip_versions[moves % args.flip_versions.len()];
        let ok =
            match admin_request(client, args, reqwest::Method::PUT, &format!("/admin/adapters/{name}/aliases/prod")) {
                Ok(req) => req.json(&json!({"version": target})).send().await.is_ok_and(|r| r.status().is_success()),
                Err(_) => false,
            };
        moves += 1;
        if !ok {
            failures += 1;
        }
        // Spread the moves over the load rather than firing them all at its start.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (moves, failures)
}

/// Cold vs warm time to first token for the adapter's highest version, then promote → first token.
async fn adapter_timings(client: &reqwest::Client, args: &Args, name: &str) -> Result<AdapterTimings> {
    let info: Value = admin_request(client, args, reqwest::Method::GET, &format!("/admin/adapters/{name}"))?
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let versions: Vec<u64> =
        info["versions"].as_array().context("no versions")?.iter().filter_map(|m| m["version"].as_u64()).collect();
    let newest = *versions.iter().max().context("the adapter has no versions")?;
    let model = format!("{name}@{newest}");
    let cold = one_request(client, args, &model).await?.0.ttft;
    let warm = one_request(client, args, &model).await?.0.ttft;
    let target = *versions.iter().min().context("no versions")?;
    let started = Instant::now();
    admin_request(client, args, reqwest::Method::PUT, &format!("/admin/adapters/{name}/aliases/prod"))?
        .json(&json!({"version": target}))
        .send()
        .await?
        .error_for_status()?;
    let promoted = started.elapsed();
    let promote_to_first = promoted + one_request(client, args, name).await?.0.ttft;
    Ok(AdapterTimings {
        adapter: name.to_owned(),
        cold_ttft_ms: cold.as_secs_f64() * 1e3,
        warm_ttft_ms: warm.as_secs_f64() * 1e3,
        promote_to_first_token_ms: promote_to_first.as_secs_f64() * 1e3,
    })
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
    let streams = (0..concurrency).map(|i| async move {
        let model = &args.models[i % args.models.len()];
        let mut out = Vec::new();
        for _ in 0..args.requests_per_stream {
            out.push(one_request(client, args, model).await);
        }
        out
    });
    let done = std::sync::atomic::AtomicBool::new(false);
    let load = async {
        let r = futures::future::join_all(streams).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    };
    let (results, flips) = futures::join!(load, flip_aliases(client, args, &done));
    let results: Vec<_> = results.into_iter().flatten().collect();
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
        alias_moves: flips.0,
        alias_move_failures: flips.1,
        requests: samples.len() + failures,
        failures,
        wall_s: wall.as_secs_f64(),
        aggregate_tok_s: total_tokens as f64 / wall.as_secs_f64(),
        per_stream_decode_tok_s_mean: decode.iter().sum::<f64>() / decode.len().max(1) as f64,
        per_stream_decode_tok_s_min: if decode.is_empty() {
            0.0
        } else {
            decode.iter().copied().fold(f64::INFINITY, f64::min)
        },
        ttft_ms_p50: percentile(&ttft, 0.5),
        ttft_ms_p99: percentile(&ttft, 0.99),
        itl_ms_p50: percentile(&itl, 0.5),
        itl_ms_p99: percentile(&itl, 0.99),
    };
    (level, prompt_tokens)
}

fn markdown(r: &Report) -> String {
    let mut s = format!(
        "Models `{}` at {}, {} generated tokens per request (EOS ignored), {}-token prompt.\n\n",
        r.models.join(","),
        r.url,
        r.max_tokens,
        r.prompt_tokens
    );
    if let Some(t) = &r.adapter_timings {
        s.push_str(&format!(
            "Adapter `{}`: first request to a version not yet in memory {:.0} ms to first token, the same request warm {:.0} ms; promote → first token of the promoted version {:.0} ms.\n\n",
            t.adapter, t.cold_ttft_ms, t.warm_ttft_ms, t.promote_to_first_token_ms
        ));
    }
    s.push_str("| streams | requests | failed | alias moves (failed) | aggregate tok/s | per-stream decode tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |\n");
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for l in &r.levels {
        s.push_str(&format!(
            "| {} | {} | {} | {} ({}) | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} |\n",
            l.concurrency,
            l.requests,
            l.failures,
            l.alias_moves,
            l.alias_move_failures,
            l.aggregate_tok_s,
            l.per_stream_decode_tok_s_mean,
            l.ttft_ms_p50,
            l.ttft_ms_p99,
            l.itl_ms_p50,
            l.itl_ms_p99
        ));
    }
    s
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.make_adapters {
        let shape = adapters::BaseModelShape::smollm2_135m();
        for i in 0..args.adapter_count {
            let path = dir.join(format!("a{i}"));
            runtime::testing::write_bench_adapter(&path, &shape, 8, 1000 + i as u64)?;
            println!("{}", path.display());
        }
        return Ok(());
    }
    let client = reqwest::Client::builder().timeout(Duration::from_secs(1800)).build()?;
    let ready = client.get(format!("{}/ready", args.url)).send().await.context("gateway unreachable")?;
    if !ready.status().is_success() {
        bail!("gateway at {} is not ready ({})", args.url, ready.status());
    }
    let adapter_timings = match &args.adapter_timings {
        Some(name) => Some(adapter_timings(&client, &args, name).await?),
        None => None,
    };
    // One untimed request per model warms caches and the allocator.
    for model in &args.models {
        one_request(&client, &args, model).await.with_context(|| format!("warm-up request to {model} failed"))?;
    }
    let mut levels = Vec::new();
    let mut prompt_tokens = 0;
    for &c in &args.concurrency {
        eprintln!("running {c} concurrent stream(s)...");
        let (level, p) = run_level(&client, &args, c).await;
        prompt_tokens = p;
        levels.push(level);
    }
    let report = Report {
        url: args.url.clone(),
        models: args.models.clone(),
        adapter_timings,
        max_tokens: args.max_tokens,
        prompt_tokens,
        levels,
    };
    let md = markdown(&report);
    println!("{md}");
    if let Some(path) = &args.out {
        std::fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if report.levels.iter().any(|l| l.failures > 0 || l.alias_move_failures > 0) {
        bail!("some requests or alias moves failed");
    }
    Ok(())
}
