//! `switchyard-overhead`: the gateway's own cost per request. Sends requests open-loop at a
//! fixed rate to a gateway running `--engine echo` (which answers instantly) and reports
//! latency percentiles and the rate achieved, for a chat completion (auth, limits, routing,
//! validation, JSON) next to `GET /health` on the same server (the HTTP round trip alone).
//! The difference is what the gateway adds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use serde::Serialize;
use serde_json::json;

#[derive(Debug, Clone, Parser)]
#[command(about = "Gateway overhead benchmark against the echo engine")]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token sent with every request.
    #[arg(long, env = "SWITCHYARD_TOKEN")]
    token: Option<String>,
    /// Model name the echo engine serves.
    #[arg(long, default_value = "echo")]
    model: String,
    /// Request rates to run, one after the other (requests per second).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    rate: Vec<u64>,
    /// Seconds per rate.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// A label for this run in the report (for example "embedded limits").
    #[arg(long, default_value = "")]
    label: String,
    /// Append the markdown rows to this file.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    label: String,
    target: String,
    rate: u64,
    sent: usize,
    failed: usize,
    achieved_rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// Sends `rate` requests per second for `seconds`, each timed from its own start; returns
/// latencies of the successful ones, the failure count and the wall time.
async fn run(client: &reqwest::Client, args: &Args, rate: u64, chat: bool) -> (Vec<Duration>, usize, Duration) {
    let total = (rate * args.seconds) as usize;
    let body = Arc::new(
        json!({"model": args.model, "messages": [{"role": "user", "content": "ping four words here"}], "max_tokens": 8}),
    );
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        // Open loop: request i leaves at i / rate whatever happened to the others.
        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        let (client, body, url, token) = (client.clone(), body.clone(), args.url.clone(), args.token.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let mut req = if chat {
                client.post(format!("{url}/v1/chat/completions")).json(&*body)
            } else {
                client.get(format!("{url}/health"))
            };
            if let Some(tok) = &token {
                req = req.bearer_auth(tok);
            }
            match req.send().await {
                Ok(res) if res.status().is_success() => res.bytes().await.ok().map(|_| t.elapsed()),
                _ => None,
            }
        }));
    }
    let mut lat = Vec::with_capacity(total);
    let mut failed = 0;
    for t in tasks {
        match t.await {
            Ok(Some(d)) => lat.push(d),
            _ => failed += 1,
        }
    }
    (lat, failed, started.elapsed())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let probe = client.get(format!("{}/v1/models", args.url));
    let probe = match &args.token {
        Some(t) => probe.bearer_auth(t),
        None => probe,
    };
    let res = probe.send().await?;
    if !res.status().is_success() {
        bail!("GET /v1/models answered {}: is the gateway up, and is the token right?", res.status());
    }
    let mut rows = Vec::new();
    for &rate in &args.rate {
        for chat in [false, true] {
            // A short warm-up so connections exist before timing starts.
            let warm = Args { seconds: 1, ..args.clone() };
            run(&client, &warm, rate.min(1000), chat).await;
            let (mut lat, failed, wall) = run(&client, &args, rate, chat).await;
            lat.sort();
            let row = Row {
                label: args.label.clone(),
                target: if chat { "POST /v1/chat/completions".into() } else { "GET /health".into() },
                rate,
                sent: lat.len() + failed,
                failed,
                achieved_rps: lat.len() as f64 / wall.as_secs_f64(),
                p50_ms: percentile(&lat, 0.50),
                p99_ms: percentile(&lat, 0.99),
                max_ms: percentile(&lat, 1.0),
            };
            eprintln!("{}", serde_json::to_string(&row)?);
            rows.push(row);
        }
    }
    let mut md = String::from("| run | rate | target | sent | failed | achieved rps | p50 ms | p99 ms | max ms |\n|---|---:|---|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.2} |\n",
            r.label, r.rate, r.target, r.sent, r.failed, r.achieved_rps, r.p50_ms, r.p99_ms, r.max_ms
        ));
    }
    for pair in rows.chunks(2) {
        if let [health, chat] = pair {
            md.push_str(&format!(
                "\n{} at {} rps: the gateway adds {:.3} ms at p50 and {:.3} ms at p99 over the bare HTTP round trip.\n",
                if chat.label.is_empty() { "chat" } else { &chat.label },
                chat.rate,
                chat.p50_ms - health.p50_ms,
                chat.p99_ms - health.p99_ms
            ));
        }
    }
    println!("{md}");
    if let Some(path) = &args.out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(f, "{md}")?;
    }
    Ok(())
}
