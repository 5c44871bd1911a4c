//! `switchyard-structured-bench`: what constrained decoding costs on a running gateway.
//!
//! Runs 16 streaming chat requests at once with no constraint, then 16 where half are held to
//! a JSON schema (the other half free, in the same batches), and reports aggregate and
//! per-stream decode tokens/s of each run and their ratio. Every request generates exactly
//! `--max-tokens` tokens: free ones ignore end-of-sequence, constrained ones fill a string
//! whose minimum length is longer than the budget. Then times compiling fresh schemas (from
//! the gateway's `switchyard_grammar_compile_seconds`) and the request latency a cold schema
//! adds over a cached one.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(about = "Constrained against unconstrained decoding on the Switchyard gateway")]
struct Args {
    /// Base URL of the gateway (a loopback address).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Streams per run.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Runs of each kind, alternating (the best of each is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Fresh schemas to compile.
    #[arg(long, default_value_t = 10)]
    schemas: usize,
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
struct Run {
    kind: String,
    constrained_streams: usize,
    wall_s: f64,
    completion_tokens: usize,
    aggregate_tok_s: f64,
    per_stream_decode_tok_s_mean: f64,
    ttft_ms_p50: f64,
    /// Whether every constrained answer so far parses as a JSON prefix of the schema's shape.
    constrained_ok: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    url: String,
    model: String,
    streams: usize,
    max_tokens: usize,
    free: Run,
    mixed: Run,
    /// The best mixed run's aggregate tokens/s ÷ the best free run's (target ≥ 0.9).
    ratio: f64,
    /// The same ratio from the mean of every round of each kind.
    ratio_of_means: f64,
    /// Every round: (free, mixed) aggregate tokens/s.
    rounds: Vec<(f64, f64)>,
    compile_ms_mean: f64,
    compile_ms_max: f64,
    /// Request latency with a schema not yet compiled, minus with the same schema cached.
    cold_schema_extra_ms: f64,
}

/// A schema every answer fills for the whole budget: one long string.
fn long_schema(salt: usize) -> Value {
    json!({"type": "object", "properties": {"story": {"type": "string", "minLength": 1500 + salt}},
        "required": ["story"], "additionalProperties": false})
}

fn request(args: &Args, constrained: Option<Value>, max_tokens: usize) -> Value {
    let mut body = json!({
        "model": args.model, "max_tokens": max_tokens, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON with a story field."}],
    });
    match constrained {
        Some(schema) => {
            body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "story", "schema": schema}})
        }
        None => body["ignore_eos"] = json!(true),
    }
    body
}

/// One streamed request: time to first token, decode time after it, tokens and the text.
async fn stream(client: &reqwest::Client, url: &str, body: &Value) -> Result<(Duration, Duration, usize, String)> {
    let started = Instant::now();
    let res = client.post(format!("{url}/v1/chat/completions")).json(body).send().await?;
    if !res.status().is_success() {
        bail!("status {}: {}", res.status(), res.text().await.unwrap_or_default());
    }
    let mut bytes = res.bytes_stream();
    let (mut buf, mut text) = (String::new(), String::new());
    let (mut first, mut last) = (None, None);
    let mut tokens = 0;
    while let Some(chunk) = bytes.next().await {
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
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                text.push_str(t);
            }
        }
    }
    let first = first.context("no text came back")?;
    Ok((first - started, last.unwrap_or(first) - first, tokens, text))
}

async fn run(client: &reqwest::Client, args: &Args, constrained: usize) -> Result<Run> {
    let started = Instant::now();
    let bodies: Vec<(bool, Value)> = (0..args.streams)
        .map(|i| {
            // Constrained and free streams interleave, so every step holds both.
            let c = i % 2 == 0 && i / 2 < constrained;
            (c, request(args, c.then(|| long_schema(0)), args.max_tokens))
        })
        .collect();
    let results = futures::future::join_all(bodies.iter().map(|(_, b)| stream(client, &args.url, b))).await;
    let wall = started.elapsed().as_secs_f64();
    let mut tokens = 0;
    let mut rates = Vec::new();
    let mut ttfts = Vec::new();
    let mut ok = true;
    for ((c, _), r) in bodies.iter().zip(results) {
        let (ttft, decode, n, text) = r?;
        tokens += n;
        ttfts.push(ttft.as_secs_f64() * 1e3);
        if n > 1 && decode > Duration::ZERO {
            rates.push((n - 1) as f64 / decode.as_secs_f64());
        }
        if *c {
            // The budget ends inside the string: the text is `{"story":"` and then no quote.
            ok &= text.starts_with("{\"story\":\"") && open_string(&text[10..]);
        }
    }
    ttfts.sort_by(f64::total_cmp);
    Ok(Run {
        kind: if constrained == 0 { "free".into() } else { "mixed".into() },
        constrained_streams: constrained,
        wall_s: wall,
        completion_tokens: tokens,
        aggregate_tok_s: tokens as f64 / wall,
        per_stream_decode_tok_s_mean: rates.iter().sum::<f64>() / rates.len().max(1) as f64,
        ttft_ms_p50: ttfts[ttfts.len() / 2],
        constrained_ok: ok,
    })
}

/// Whether `s` stays inside one JSON string (no unescaped quote).
fn open_string(s: &str) -> bool {
    let mut escaped = false;
    for c in s.chars() {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => return false,
            _ => {}
        }
    }
    true
}

async fn compile_metric(client: &reqwest::Client, url: &str) -> Result<(f64, f64)> {
    let page = client.get(format!("{url}/metrics")).send().await?.text().await?;
    let read = |name: &str| {
        page.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((read("switchyard_grammar_compile_seconds_sum"), read("switchyard_grammar_compile_seconds_count")))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = reqwest::Client::new();
    // Warm-up: the first requests fault the weights in.
    run(&client, &args, 0).await?;
    let (mut free, mut mixed): (Option<Run>, Option<Run>) = (None, None);
    let mut rounds = Vec::new();
    for _ in 0..args.rounds {
        let f = run(&client, &args, 0).await?;
        let m = run(&client, &args, args.streams / 2).await?;
        eprintln!("free {:.1} tok/s, mixed {:.1} tok/s", f.aggregate_tok_s, m.aggregate_tok_s);
        rounds.push((f.aggregate_tok_s, m.aggregate_tok_s));
        if free.as_ref().is_none_or(|b| f.aggregate_tok_s > b.aggregate_tok_s) {
            free = Some(f);
        }
        if mixed.as_ref().is_none_or(|b| m.aggregate_tok_s > b.aggregate_tok_s) {
            mixed = Some(m);
        }
    }
    let (free, mixed) = (free.context("no rounds")?, mixed.context("no rounds")?);

    // Compile time of fresh schemas, and what a cold schema adds to one short request.
    let (sum0, count0) = compile_metric(&client, &args.url).await?;
    let mut worst: f64 = 0.0;
    let mut extra = Vec::new();
    for i in 0..args.schemas {
        let schema = json!({"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 100000 + i},
            "name": {"type": "string", "maxLength": 40}, "tags": {"type": "array", "items": {"enum": ["a", "b", format!("t{i}")]}, "maxItems": 4},
            "address": {"type": "object", "properties": {"street": {"type": "string", "pattern": "^[A-Za-z ]{1,30}$"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["street", "zip"]}},
            "required": ["id", "name", "address"]});
        let (s_before, _) = compile_metric(&client, &args.url).await?;
        let t = Instant::now();
        stream(&client, &args.url, &request(&args, Some(schema.clone()), 1)).await?;
        let cold = t.elapsed().as_secs_f64();
        let (s_after, _) = compile_metric(&client, &args.url).await?;
        worst = worst.max(s_after - s_before);
        let t = Instant::now();
        stream(&client, &args.url, &request(&args, Some(schema), 1)).await?;
        extra.push((cold - t.elapsed().as_secs_f64()) * 1e3);
    }
    let (sum1, count1) = compile_metric(&client, &args.url).await?;
    let compiled = (count1 - count0).max(1.0);
    extra.sort_by(f64::total_cmp);
    let report = Report {
        url: args.url.clone(),
        model: args.model.clone(),
        streams: args.streams,
        max_tokens: args.max_tokens,
        ratio: mixed.aggregate_tok_s / free.aggregate_tok_s,
        ratio_of_means: rounds.iter().map(|r| r.1).sum::<f64>() / rounds.iter().map(|r| r.0).sum::<f64>(),
        rounds,
        free,
        mixed,
        compile_ms_mean: (sum1 - sum0) / compiled * 1e3,
        compile_ms_max: worst * 1e3,
        cold_schema_extra_ms: extra[extra.len() / 2],
    };
    let md = format!(
        "| run | constrained streams | aggregate tok/s | per-stream decode tok/s | TTFT p50 ms | answers well formed |\n\
         |---|---|---|---|---|---|\n\
         | free | 0 of {s} | {:.1} | {:.1} | {:.0} | — |\n\
         | mixed | {} of {s} | {:.1} | {:.1} | {:.0} | {} |\n\n\
         **mixed ÷ free: {:.3}** best run against best run, {:.3} mean against mean over {} rounds \
         (target ≥ 0.9). Schema compile: mean {:.2} ms, max {:.2} ms over {} fresh schemas; \
         a cold schema adds {:.1} ms (median) to a 1-token request.\n",
        report.free.aggregate_tok_s,
        report.free.per_stream_decode_tok_s_mean,
        report.free.ttft_ms_p50,
        report.mixed.constrained_streams,
        report.mixed.aggregate_tok_s,
        report.mixed.per_stream_decode_tok_s_mean,
        report.mixed.ttft_ms_p50,
        report.mixed.constrained_ok,
        report.ratio,
        report.ratio_of_means,
        report.rounds.len(),
        report.compile_ms_mean,
        report.compile_ms_max,
        args.schemas,
        report.cold_schema_extra_ms,
        s = args.streams,
    );
    print!("{md}");
    if let Some(p) = &args.out {
        std::fs::write(p, &md)?;
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    if !report.mixed.constrained_ok {
        bail!("a constrained answer broke its schema");
    }
    Ok(())
}
