//! `switchyard-kb-bench`: knowledge-base scale. Store mode builds knowledge bases of 10,000 and
//! 100,000 chunks (synthetic text over a Zipf vocabulary, random unit vectors: the embedding
//! model is not in the loop) and reports ingestion (documents/s, chunks/s: chunking, storage,
//! indexing) and hybrid search latency (p50/p99). HTTP mode posts real documents to a running
//! gateway, embeddings included, and reports end-to-end ingestion and `/search` latency.

use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use knowledge::chunk::{chunk, ChunkOptions};
use knowledge::extract::Format;
use knowledge::store::{KnowledgeBases, NewDocument};

#[derive(Parser)]
struct Args {
    /// Chunk counts to build and search (store mode).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    chunks: Vec<usize>,
    /// Searches per size.
    #[arg(long, default_value_t = 500)]
    queries: usize,
    /// A running gateway (with its embedding model) to measure end to end instead.
    #[arg(long)]
    http: Option<String>,
    /// Documents to post in HTTP mode.
    #[arg(long, default_value_t = 200)]
    docs: usize,
    /// Where to write the JSON report.
    #[arg(long, default_value = "kb-bench.json")]
    out: String,
}

const DIM: usize = 384;
const WORDS_PER_SENTENCE: usize = 14;
const SENTENCES_PER_DOC: usize = 60;

/// A small deterministic generator (xorshift), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// A Zipf-ish word index over a vocabulary of `n`.
    fn word(&mut self, n: usize) -> usize {
        ((n as f64).powf(self.unit()) as usize).saturating_sub(1).min(n - 1)
    }
    fn vector(&mut self) -> Vec<f32> {
        let mut v: Vec<f32> = (0..DIM).map(|_| (self.unit() * 2.0 - 1.0) as f32).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }
}

fn vocabulary() -> Vec<String> {
    let syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "sa", "do", "fu"];
    let mut words = Vec::new();
    for a in syllables {
        for b in syllables {
            for c in syllables {
                words.push(format!("{a}{b}{c}"));
            }
        }
    }
    words
}

fn document(rng: &mut Rng, vocab: &[String]) -> String {
    let mut text = String::new();
    for s in 0..SENTENCES_PER_DOC {
        if s % 20 == 0 {
            text.push_str(&format!("# Section {}\n\n", s / 20 + 1));
        }
        let words: Vec<&str> = (0..WORDS_PER_SENTENCE).map(|_| vocab[rng.word(vocab.len())].as_str()).collect();
        text.push_str(&words.join(" "));
        text.push_str(". ");
        if s % 5 == 4 {
            text.push_str("\n\n");
        }
    }
    text
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn store_mode(args: &Args) -> anyhow::Result<serde_json::Value> {
    let vocab = vocabulary();
    let mut report = Vec::new();
    for &target in &args.chunks {
        let dir = tempfile_dir()?;
        let kbs = KnowledgeBases::open(&dir, DIM)?;
        let kb = kbs.create("bench", "bench")?;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut docs, mut chunks, mut chunk_time, mut store_time) = (0usize, 0usize, 0f64, 0f64);
        while chunks < target {
            let text = document(&mut rng, &vocab);
            let t = Instant::now();
            let pieces = chunk(&text, &ChunkOptions::default());
            chunk_time += t.elapsed().as_secs_f64();
            let vectors: Vec<Vec<f32>> = pieces.iter().map(|_| rng.vector()).collect();
            chunks += pieces.len();
            docs += 1;
            let doc = NewDocument {
                title: format!("doc {docs}"),
                text,
                source: None,
                format: Format::Markdown,
                metadata: serde_json::json!({}),
            };
            let t = Instant::now();
            kbs.add_document("bench", &kb.id, doc, pieces, vectors)?;
            store_time += t.elapsed().as_secs_f64();
        }
        let total = chunk_time + store_time;
        let mut latencies = Vec::with_capacity(args.queries);
        for _ in 0..args.queries {
            let query: Vec<&str> = (0..6).map(|_| vocab[rng.word(vocab.len())].as_str()).collect();
            let vector = rng.vector();
            let t = Instant::now();
            let hits = kbs.search("bench", &kb.id, &query.join(" "), &vector, 5)?;
            latencies.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(!hits.is_empty(), "a search found nothing");
        }
        latencies.sort_by(f64::total_cmp);
        let t = Instant::now();
        drop(kbs);
        let reopened = KnowledgeBases::open(&dir, DIM)?;
        let reopen_s = t.elapsed().as_secs_f64();
        drop(reopened);
        let row = serde_json::json!({
            "chunks": chunks, "documents": docs,
            "ingest_documents_per_s": docs as f64 / total, "ingest_chunks_per_s": chunks as f64 / total,
            "chunking_s": chunk_time, "store_and_index_s": store_time,
            "search_p50_ms": percentile(&latencies, 0.5), "search_p99_ms": percentile(&latencies, 0.99),
            "reopen_s": reopen_s,
        });
        println!("{row}");
        report.push(row);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(serde_json::json!({"mode": "store", "dimension": DIM, "results": report}))
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("kb-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn http_mode(base: &str, args: &Args) -> anyhow::Result<serde_json::Value> {
    let client = reqwest::Client::new();
    let kb: serde_json::Value = client
        .post(format!("{base}/v1/knowledge-bases"))
        .json(&serde_json::json!({"name": "bench"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = kb["id"].as_str().context("no knowledge base id")?.to_owned();
    let vocab = vocabulary();
    let mut rng = Rng(7);
    let started = Instant::now();
    let mut chunks = 0u64;
    for i in 0..args.docs {
        let doc: serde_json::Value = client
            .post(format!("{base}/v1/knowledge-bases/{id}/documents"))
            .json(&serde_json::json!({"title": format!("doc {i}"), "text": document(&mut rng, &vocab), "format": "markdown"}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        chunks += doc["chunks"].as_u64().unwrap_or(0);
    }
    let ingest = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    for _ in 0..args.queries.min(200) {
        let query: Vec<&str> = (0..6).map(|_| vocab[rng.word(vocab.len())].as_str()).collect();
        let t = Instant::now();
        client
            .post(format!("{base}/v1/knowledge-bases/{id}/search"))
            .json(&serde_json::json!({"query": query.join(" "), "k": 5}))
            .send()
            .await?
            .error_for_status()?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    let row = serde_json::json!({
        "mode": "http", "documents": args.docs, "chunks": chunks,
        "ingest_documents_per_s": args.docs as f64 / ingest, "ingest_chunks_per_s": chunks as f64 / ingest,
        "search_p50_ms": percentile(&latencies, 0.5), "search_p99_ms": percentile(&latencies, 0.99),
    });
    println!("{row}");
    Ok(row)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = match &args.http {
        Some(base) => http_mode(base.trim_end_matches('/'), &args).await?,
        None => store_mode(&args)?,
    };
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    Ok(())
}
