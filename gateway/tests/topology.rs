//! The multi-replica topology as plain processes (`deploy/local-topology.sh`): two gateways over
//! one data directory and one Redis, the sidecar, nginx in front. Traffic goes through nginx;
//! the test checks that it spreads, that a promote through one replica is served by the other
//! within 500 ms, that a replica killed with SIGKILL loses no acknowledged registry write while
//! nginx keeps serving, that the restarted replica catches up, and that a rolling restart under
//! 16 streams fails no request. It prints the figures deploy/README.md quotes.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, PrivateRedis};
use serde_json::{json, Value};

const TOKEN: &str = "topology-admin-token";

struct Topology {
    dir: PathBuf,
    env: HashMap<String, String>,
    script_env: Vec<(String, String)>,
}

impl Topology {
    fn script(&self, args: &[&str]) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local-topology.sh");
        let out = Command::new("bash")
            .arg(script)
            .args(args)
            .envs(self.script_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run deploy/local-topology.sh");
        assert!(
            out.status.success(),
            "local-topology.sh {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(dir: &Path, model: &Path, imports: &Path, redis_url: &str) -> Self {
        Self::start_with(dir, model, imports, redis_url, "")
    }

    /// Like [`Topology::start`], with extra flags for both replicas.
    fn start_with(dir: &Path, model: &Path, imports: &Path, redis_url: &str, extra: &str) -> Self {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_switchyard"));
        let script_env = vec![
            ("SWITCHYARD_BIN".to_owned(), bin.display().to_string()),
            ("FINETUNE_BIN".to_owned(), bin.with_file_name("finetune").display().to_string()),
            ("MODEL".to_owned(), model.display().to_string()),
            ("IMPORT_ROOT".to_owned(), imports.display().to_string()),
            ("REDIS_URL".to_owned(), redis_url.to_owned()),
            ("ADMIN_TOKEN".to_owned(), TOKEN.to_owned()),
            ("RUST_LOG".to_owned(), "warn".to_owned()),
            ("EXTRA_GATEWAY_ARGS".to_owned(), extra.to_owned()),
        ];
        let mut t = Topology { dir: dir.to_owned(), env: HashMap::new(), script_env };
        t.script(&["start", &dir.display().to_string()]);
        t.reload_env();
        t
    }

    fn reload_env(&mut self) {
        let text = std::fs::read_to_string(self.dir.join("topology.env")).unwrap();
        self.env = text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect();
    }

    fn url(&self, which: &str) -> String {
        self.env[which].clone()
    }

    fn pid(&self, replica: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("gateway-{replica}.pid"))).unwrap().trim().to_owned()
    }

    fn signal(&self, replica: &str, signal: &str) {
        let pid = self.pid(replica);
        assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
        // The process is the script's child, not ours: wait until it is gone.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
        {
            assert!(Instant::now() < deadline, "gateway {replica} did not exit after {signal}");
            std::thread::yield_now();
        }
    }

    fn restart(&self, replica: &str) {
        self.script(&["start-replica", &self.dir.display().to_string(), replica]);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.script(&["stop", &self.dir.display().to_string()]);
    }
}

async fn completion(base: &str, model: &str) -> Result<String, String> {
    let body = json!({"model": model, "prompt": "the cat sat on", "max_tokens": 8, "temperature": 1.5, "seed": 7, "ignore_eos": true});
    let res = client().post(format!("{base}/v1/completions")).json(&body).send().await.map_err(|e| e.to_string())?;
    let status = res.status();
    let text = res.text().await.map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{status}: {e}: {}", text.chars().take(200).collect::<String>()))?;
    if status != 200 {
        return Err(format!("{status}: {v}"));
    }
    Ok(v["choices"][0]["text"].as_str().unwrap_or_default().to_owned())
}

/// A short greedy chat answer through `base`; its id, for feedback.
async fn chat_id(base: &str, text: &str) -> String {
    let body = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": text}], "max_tokens": 2, "temperature": 0});
    let answer: Value =
        client().post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap().json().await.unwrap();
    answer["id"].as_str().unwrap().to_owned()
}

async fn admin(base: &str, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
    let res = client().request(method, format!("{base}{path}")).bearer_auth(TOKEN).json(&body).send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

async fn served_completions(base: &str) -> f64 {
    let page = client().get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    page.lines()
        .filter(|l| l.starts_with("switchyard_requests_total{") && l.contains("route=\"/v1/completions\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `streams` loops sending completions through nginx until `stop`; returns (ok, failed).
fn load(base: String, streams: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..streams {
            let (base, stop, ok, failed) = (base.clone(), stop.clone(), ok.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    match completion(&base, "tiny-llama").await {
                        Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            failed.lock().push(e);
                            0
                        }
                    };
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let failed = failed.lock().clone();
        (ok.load(Ordering::SeqCst), failed)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_behind_nginx_share_one_registry_and_survive_kills_and_restarts() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    let shape = runtime::testing::write_tiny_llama(&model, 5).unwrap();
    let imports = root.path().join("imports");
    for k in 0..3u64 {
        runtime::testing::write_random_adapter(&imports.join(format!("v{k}")), &shape, 4, 40 + k, false).unwrap();
    }
    let redis = PrivateRedis::start(common::free_port());
    let redis_url = format!("redis://127.0.0.1:{}", redis.port);
    let topo = Topology::start(&root.path().join("topology"), &model, &imports, &redis_url);
    let (nginx, a, b) = (topo.url("NGINX_URL"), topo.url("GATEWAY_A_URL"), topo.url("GATEWAY_B_URL"));

    // Requests spread over both replicas.
    let before = (served_completions(&a).await, served_completions(&b).await);
    for _ in 0..40 {
        completion(&nginx, "tiny-llama").await.unwrap();
    }
    let spread = (served_completions(&a).await - before.0, served_completions(&b).await - before.1);
    println!("40 requests through nginx: {} on replica a, {} on replica b", spread.0, spread.1);
    assert!(spread.0 >= 5.0 && spread.1 >= 5.0, "{spread:?}");

    // Two versions through nginx; a promote through replica a is served by replica b.
    for v in ["v0", "v1"] {
        let (status, _) =
            admin(&nginx, reqwest::Method::POST, "/admin/adapters/bot/versions", json!({"path": v})).await;
        assert_eq!(status, 201);
    }
    let at1 = completion(&a, "bot@1").await.unwrap();
    let at2 = completion(&a, "bot@2").await.unwrap();
    assert_ne!(at1, at2);
    let mut worst = Duration::ZERO;
    for (version, want) in [(1, &at1), (2, &at2), (1, &at1)] {
        let (status, _) =
            admin(&a, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", json!({"version": version})).await;
        assert_eq!(status, 200);
        let moved = Instant::now();
        while completion(&b, "bot").await.as_ref() != Ok(want) {
            assert!(moved.elapsed() < Duration::from_millis(500), "replica b still serves the old prod");
        }
        worst = worst.max(moved.elapsed());
    }
    println!("promote on replica a served by replica b within {} ms (worst of 3)", worst.as_millis());

    // Answers to give feedback on while a replica dies.
    let mut answers = Vec::new();
    for i in 0..60 {
        answers.push(chat_id(&nginx, &format!("q {i}")).await);
    }

    // SIGKILL replica b under 16 streams of load, registry writes and feedback through nginx.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(nginx.clone(), 16, stop.clone());
    let writer = {
        let nginx = nginx.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let sent = client()
                    .post(format!("{nginx}/admin/adapters/bot/versions"))
                    .bearer_auth(TOKEN)
                    .json(&json!({"path": "v2"}))
                    .send()
                    .await;
                if let Ok(res) = sent {
                    if res.status() == 201 {
                        let v: Value = res.json().await.unwrap();
                        acked.push(v["version"].as_u64().unwrap());
                    }
                }
            }
            acked
        })
    };
    let feedback = {
        let nginx = nginx.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for id in answers {
                let fb = json!({"response_id": id, "thumbs": "up"});
                if let Ok(res) = client().post(format!("{nginx}/v1/feedback")).json(&fb).send().await {
                    if res.status() == 201 {
                        let v: Value = res.json().await.unwrap();
                        acked.push(v["id"].as_str().unwrap().to_owned());
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    topo.signal("b", "-KILL");
    let killed = Instant::now();
    // While b is down a promote goes through nginx (to a): b must catch up when it returns.
    let (status, _) =
        admin(&nginx, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", json!({"version": 2})).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // After the kill has settled, nginx serves everything from a.
    for _ in 0..10 {
        completion(&nginx, "tiny-llama").await.expect("nginx keeps serving from the other replica");
    }
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = traffic.await.unwrap();
    let acked = writer.await.unwrap();
    let feedback_acked = feedback.await.unwrap();
    let (_, listed) = admin(&nginx, reqwest::Method::GET, "/admin/feedback?limit=1000", Value::Null).await;
    let listed: Vec<&str> = listed["data"].as_array().unwrap().iter().filter_map(|r| r["id"].as_str()).collect();
    for id in &feedback_acked {
        assert!(listed.contains(&id.as_str()), "acknowledged feedback {id} was lost");
    }
    println!("feedback during the kill: {} of 60 acknowledged, none lost", feedback_acked.len());
    println!(
        "SIGKILL of replica b under 16 streams: {ok} requests answered, {} failed (in flight on b), {} registry writes acknowledged, kill settled in {} ms",
        failed.len(),
        acked.len(),
        killed.elapsed().as_millis()
    );
    let snapshot = adapters::registry::read_snapshot(&PathBuf::from(&topo.env["DATA_DIR"]).join("registry")).unwrap();
    for v in &acked {
        assert!(snapshot.adapter("bot").unwrap().versions.contains_key(v), "acknowledged version {v} was lost");
    }
    assert_eq!(adapters::registry::verify(&PathBuf::from(&topo.env["DATA_DIR"]).join("registry")).unwrap().len(), 0);

    // The restarted replica serves the promote it missed.
    topo.restart("b");
    assert_eq!(completion(&b, "bot").await.unwrap(), at2, "replica b caught up on the promote it missed");

    // A rolling restart (SIGTERM one, wait for ready, then the other) under 16 streams.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(nginx.clone(), 16, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    for replica in ["a", "b"] {
        topo.signal(replica, "-TERM");
        topo.restart(replica);
    }
    let rolled = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = traffic.await.unwrap();
    println!(
        "rolling restart under 16 streams: {ok} requests answered, {} failed, in {} ms",
        failed.len(),
        rolled.as_millis()
    );
    assert!(failed.is_empty(), "requests failed during the rolling restart: {:?}", &failed[..failed.len().min(5)]);
    drop(topo);
}

/// Through the same topology: feedback posted through nginx (to either replica) is trained on
/// exactly once by the sidecar, and a rate limit is one window for both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feedback_is_trained_once_and_a_rate_limit_is_shared() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    runtime::testing::write_tiny_llama_with_head(&model, 3, 2.0).unwrap();
    let imports = root.path().join("imports");
    std::fs::create_dir_all(&imports).unwrap();
    let redis = PrivateRedis::start(common::free_port());
    let redis_url = format!("redis://127.0.0.1:{}", redis.port);
    let mut topo =
        Topology::start_with(&root.path().join("topology"), &model, &imports, &redis_url, "--rate-limit-rpm 200");
    topo.reload_env();
    let (nginx, a, b) = (topo.url("NGINX_URL"), topo.url("GATEWAY_A_URL"), topo.url("GATEWAY_B_URL"));

    // 24 answers with corrections, each accepted, all through nginx.
    for i in 0..24 {
        let id = chat_id(&nginx, &format!("question {i}")).await;
        let fb = json!({"response_id": id, "thumbs": "down", "correction": "paris"});
        let res = client().post(format!("{nginx}/v1/feedback")).json(&fb).send().await.unwrap();
        assert_eq!(res.status(), 201, "feedback on an answer from either replica");
        let record: Value = res.json().await.unwrap();
        let path = format!("/admin/feedback/{}/review", record["id"].as_str().unwrap());
        let (status, reviewed) = admin(&nginx, reqwest::Method::POST, &path, json!({"action": "accept"})).await;
        assert_eq!(status, 200, "a review through either replica: {reviewed}");
    }
    // The sidecar (Redis stream, 20 new accepted records start a job) trains once.
    let started = Instant::now();
    let job = loop {
        let (_, jobs) = admin(&nginx, reqwest::Method::GET, "/admin/finetune/jobs", Value::Null).await;
        let list = jobs["data"].as_array().cloned().unwrap_or_default();
        if let Some(done) = list.iter().find(|j| j["state"] == "succeeded" || j["state"] == "failed") {
            break done.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(180), "no job finished: {jobs}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(job["state"], "succeeded", "{job}");
    // A few more sidecar polls start nothing new: every record was trained on once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, jobs) = admin(&nginx, reqwest::Method::GET, "/admin/finetune/jobs", Value::Null).await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 1, "{jobs}");
    let (_, adapter) = admin(&nginx, reqwest::Method::GET, "/admin/adapters/support-bot", Value::Null).await;
    assert_eq!(adapter["versions"][0]["lineage"]["dataset"]["feedback"]["count"], 24, "{adapter}");
    println!("24 feedback records through nginx: one job, trained in {} s", started.elapsed().as_secs());

    // One window for both replicas: each request, to either one, leaves one fewer.
    let remaining = |res: &reqwest::Response| {
        res.headers()["x-ratelimit-remaining-requests"].to_str().unwrap().parse::<i64>().unwrap()
    };
    let first = remaining(
        &client()
            .post(format!("{a}/v1/completions"))
            .json(&json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 1}))
            .send()
            .await
            .unwrap(),
    );
    for (k, base) in [&b, &a, &b, &a].into_iter().enumerate() {
        let res = client()
            .post(format!("{base}/v1/completions"))
            .json(&json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(remaining(&res), first - 1 - k as i64, "request {k} to {base}");
    }
    drop(topo);
}
