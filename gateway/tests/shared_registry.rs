//! Many writers on one registry: three gateway processes and the training sidecar share one data
//! directory (without Redis, then with it) while 300 uploads, compare-and-set alias moves,
//! rollbacks and deletes go to all three at once; and a gateway killed with SIGKILL in the middle
//! of its writes restarts into a registry that verifies, with every acknowledged write kept.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, Server};
use finetune::job::CurateArgs;
use finetune::sidecar::SidecarConfig;
use protocol::params::TrainArgs;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::task::JoinSet;

const TOKEN: &str = "shared-registry-token";
/// Distinct adapter files in the import root; uploads cycle through them.
const VARIANTS: u64 = 10;

struct Setup {
    _root: tempfile::TempDir,
    model: PathBuf,
    data: PathBuf,
    imports: PathBuf,
}

fn setup() -> Setup {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    let shape = runtime::testing::write_tiny_llama(&model, 5).unwrap();
    let imports = root.path().join("imports");
    for k in 0..VARIANTS {
        runtime::testing::write_random_adapter(&imports.join(format!("v{k}")), &shape, 2, 100 + k, false).unwrap();
    }
    let rows: String =
        (0..20).map(|i| format!("{}\n", json!({"instruction": format!("say {i}"), "output": "paris"}))).collect();
    std::fs::write(imports.join("set.jsonl"), rows).unwrap();
    let data = root.path().join("data");
    Setup { model, data, imports, _root: root }
}

fn start(s: &Setup, redis: Option<&str>) -> Server {
    let mut args: Vec<String> = [
        "--model",
        &s.model.display().to_string(),
        "--data-dir",
        &s.data.display().to_string(),
        "--admin-token",
        TOKEN,
        "--import-root",
        &s.imports.display().to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    if let Some(url) = redis {
        args.extend(["--redis-url".to_owned(), url.to_owned()]);
    }
    Server::start_raw(&args)
}

async fn admin(base: &str, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method, format!("{base}{path}")).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A small deterministic generator, so a failing run can be replayed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// What one operation of the storm sent and got back.
#[derive(Debug, Clone)]
enum Outcome {
    Upload { status: u16, version: Option<u64> },
    Move { status: u16, expected: u64, to: u64, body: Value },
    Rollback { status: u16, body: Value },
    Delete { status: u16, version: u64, body: Value },
}

async fn storm_op(base: String, op: usize, seed: u64) -> Outcome {
    let mut rng = Lcg(seed);
    match op % 10 {
        // Six in ten are uploads (300 of 500 operations).
        0..=5 => {
            let body = json!({"path": format!("v{}", op as u64 % VARIANTS)});
            let (status, v) = admin(&base, Method::POST, "/admin/adapters/bot/versions", Some(body)).await;
            Outcome::Upload { status, version: v["version"].as_u64() }
        }
        6 | 7 => {
            // Read where prod points on this replica, then move it only if it still points there.
            let (_, adapter) = admin(&base, Method::GET, "/admin/adapters/bot", None).await;
            let expected = adapter["aliases"]["prod"]["version"].as_u64().unwrap();
            let versions: Vec<u64> =
                adapter["versions"].as_array().unwrap().iter().filter_map(|m| m["version"].as_u64()).collect();
            let to = versions[rng.below(versions.len() as u64) as usize];
            let body = json!({"version": to, "expected_version": expected});
            let (status, body) = admin(&base, Method::PUT, "/admin/adapters/bot/aliases/prod", Some(body)).await;
            Outcome::Move { status, expected, to, body }
        }
        8 => {
            let (status, body) = admin(&base, Method::POST, "/admin/adapters/bot/aliases/prod/rollback", None).await;
            Outcome::Rollback { status, body }
        }
        _ => {
            let version = 2 + rng.below(300);
            let (status, body) =
                admin(&base, Method::DELETE, &format!("/admin/adapters/bot/versions/{version}"), None).await;
            Outcome::Delete { status, version, body }
        }
    }
}

fn sidecar(s: &Setup, gateway: &str) -> SidecarConfig {
    SidecarConfig {
        data_dir: s.data.clone(),
        base: s.model.clone(),
        gateway: gateway.to_owned(),
        admin_token: TOKEN.into(),
        redis_url: None,
        adapter: "bot".into(),
        feedback_from: None,
        feedback_task: None,
        min_new_records: 1_000_000,
        poll: Duration::from_millis(100),
        promote_margin: None,
        args: TrainArgs { epochs: Some(1.0), lora_rank: Some(2), ..TrainArgs::default() },
        curate: CurateArgs::default(),
        once: true,
        progress: false,
    }
}

/// The audit log on disk, oldest first.
fn audit(data: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(data.join("registry/audit.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

async fn many_writers(redis: Option<&str>) {
    let s = setup();
    let servers = [start(&s, redis), start(&s, redis), start(&s, redis)];
    let bases: Vec<String> = servers.iter().map(|g| g.base.clone()).collect();
    // One version and prod on it before the storm, so every move can name what it expects.
    let (status, _) = admin(&bases[0], Method::POST, "/admin/adapters/bot/versions", Some(json!({"path": "v0"}))).await;
    assert_eq!(status, 201);
    let (status, _) =
        admin(&bases[0], Method::PUT, "/admin/adapters/bot/aliases/prod", Some(json!({"version": 1}))).await;
    assert_eq!(status, 200);
    for base in &bases {
        let started = Instant::now();
        while admin(base, Method::GET, "/admin/adapters/bot", None).await.1["aliases"]["prod"].is_null() {
            assert!(started.elapsed() < Duration::from_secs(1), "{base} never saw the first version");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A training job for the sidecar, which registers its result through the second replica.
    let job = json!({"adapter": "bot", "dataset": {"kind": "file", "path": "set.jsonl"}, "params": {"save_steps": 0}});
    let (status, job) = admin(&bases[1], Method::POST, "/admin/finetune/jobs", Some(job)).await;
    assert_eq!(status, 201, "{job}");
    let sidecar_cfg = sidecar(&s, &bases[1]);
    let sidecar = tokio::task::spawn_blocking(move || finetune::sidecar::run(&sidecar_cfg));

    // Uploads and alias moves race the sidecar; the deletes of random version numbers come
    // once it is done (its version then carries an alias and is refused with 409), so that a
    // delete cannot take the job's version between its upload and its alias.
    let mut ops = JoinSet::new();
    for op in (0..500).filter(|op| op % 10 != 9) {
        ops.spawn(storm_op(bases[op % 3].clone(), op, 7919 * op as u64 + 1));
    }
    let mut outcomes: Vec<Outcome> = ops.join_all().await;
    sidecar.await.unwrap().unwrap();
    let mut deletes = JoinSet::new();
    for op in (0..500).filter(|op| op % 10 == 9) {
        deletes.spawn(storm_op(bases[op % 3].clone(), op, 7919 * op as u64 + 1));
    }
    outcomes.extend(deletes.join_all().await);

    let (status, job) =
        admin(&bases[2], Method::GET, &format!("/admin/finetune/jobs/{}", job["id"].as_str().unwrap()), None).await;
    assert_eq!((status, job["state"].as_str()), (200, Some("succeeded")), "{job}");
    let job_version = job["version"].as_u64().unwrap();

    // Every answer is one the route documents, and nothing failed on the server's side.
    let mut acked = BTreeMap::<&str, usize>::new();
    let mut uploaded = BTreeSet::new();
    let mut deleted = BTreeSet::new();
    for o in &outcomes {
        match o {
            Outcome::Upload { status, version } => {
                assert_eq!(*status, 201, "every upload is stored: {o:?}");
                assert!(uploaded.insert(version.unwrap()), "a version number handed out twice: {o:?}");
                *acked.entry("register").or_default() += 1;
            }
            Outcome::Move { status: 200, expected, to, body } => {
                assert_eq!(body["from"].as_u64(), Some(*expected), "{body}");
                if expected != to {
                    *acked.entry("promote").or_default() += 1;
                }
            }
            Outcome::Move { status: 409, expected, body, .. } => {
                // A real conflict: prod pointed elsewhere when the move was tried.
                assert_eq!(body["error"]["code"], "alias_conflict", "{body}");
                let message = body["error"]["message"].as_str().unwrap();
                assert!(!message.contains(&format!("points to version {expected},")), "{message}");
            }
            Outcome::Move { status: 404, body, .. } => assert_eq!(body["error"]["code"], "version_not_found", "{body}"),
            Outcome::Rollback { status: 200, .. } => *acked.entry("rollback").or_default() += 1,
            Outcome::Rollback { status: 409, body } => {
                assert_eq!(body["error"]["code"], "no_rollback_target", "{body}")
            }
            Outcome::Delete { status: 200, version, .. } => {
                deleted.insert(*version);
                *acked.entry("delete").or_default() += 1;
            }
            Outcome::Delete { status: 409, body, .. } => assert_eq!(body["error"]["code"], "version_in_use", "{body}"),
            Outcome::Delete { status: 404, body, .. } => {
                assert_eq!(body["error"]["code"], "version_not_found", "{body}")
            }
            other => panic!("unexpected answer: {other:?}"),
        }
    }
    eprintln!("storm (redis: {}): {acked:?} acknowledged besides uploads", redis.is_some());
    assert_eq!(uploaded.len(), 300);
    assert!(acked.get("promote").copied().unwrap_or(0) > 0 && !deleted.is_empty(), "{acked:?}");

    // The registry verifies: every version's files match its hash, every alias names a version.
    let root = s.data.join("registry");
    assert_eq!(adapters::registry::verify(&root).unwrap(), Vec::<String>::new());
    let snapshot = adapters::registry::read_snapshot(&root).unwrap();
    let entry = snapshot.adapter("bot").unwrap();
    let expected_versions: BTreeSet<u64> =
        [1, job_version].into_iter().chain(uploaded.iter().copied()).filter(|v| !deleted.contains(v)).collect();
    assert_eq!(entry.versions.keys().copied().collect::<BTreeSet<_>>(), expected_versions);

    // Exactly one audit line per acknowledged change (plus the set-up and the sidecar's own two).
    let records = audit(&s.data);
    let count = |action: &str, alias: Option<&str>| {
        records.iter().filter(|r| r["action"] == action && alias.is_none_or(|a| r["alias"] == a)).count()
    };
    assert_eq!(count("register", None), 300 + 2);
    assert_eq!(count("promote", Some("prod")), acked.get("promote").copied().unwrap_or(0) + 1);
    assert_eq!(count("promote", Some("candidate")), 1);
    assert_eq!(count("rollback", None), acked.get("rollback").copied().unwrap_or(0));
    assert_eq!(count("delete", None), deleted.len());
    // Compare-and-set held across processes: each move of prod starts where the last one ended.
    let moves: Vec<&Value> = records.iter().filter(|r| r["alias"] == "prod").collect();
    for pair in moves.windows(2) {
        assert_eq!(pair[1]["from"], pair[0]["to"], "a lost update: {pair:?}");
    }
    assert_eq!(entry.aliases["prod"].version, moves.last().unwrap()["to"].as_u64().unwrap());

    // Every replica serves what is on disk within a second.
    let want: Vec<u64> = expected_versions.iter().copied().collect();
    for base in &bases {
        let started = Instant::now();
        loop {
            let (_, listing) = admin(base, Method::GET, "/admin/adapters/bot", None).await;
            let have: Vec<u64> =
                listing["versions"].as_array().unwrap().iter().filter_map(|m| m["version"].as_u64()).collect();
            if have == want && listing["aliases"]["prod"]["version"].as_u64() == Some(entry.aliases["prod"].version) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(1), "{base} still lists {have:?}, disk has {want:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drop(servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_and_a_sidecar_write_one_registry_without_redis() {
    many_writers(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_and_a_sidecar_write_one_registry_with_redis() {
    let url = std::env::var("SWITCHYARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    many_writers(Some(&url)).await;
}

/// What the killed gateway acknowledged before it died.
#[derive(Default)]
struct Acked {
    /// Version number → the import it was made from.
    registered: BTreeMap<u64, u64>,
    deleted: BTreeSet<u64>,
    /// Every version a delete was sent for; one the kill cut off may or may not have happened.
    delete_tried: BTreeSet<u64>,
    /// Every prod target asked for, and the last one acknowledged.
    prod_tried: BTreeSet<u64>,
    prod_acked: Option<u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_killed_mid_write_restarts_into_a_registry_that_verifies() {
    let s = setup();
    let root = s.data.join("registry");
    let hashes: Vec<String> =
        (0..VARIANTS).map(|k| adapters::content_hash(&s.imports.join(format!("v{k}"))).unwrap()).collect();
    let acked = Arc::new(parking_lot::Mutex::new(Acked::default()));
    let mut rng = Lcg(42);
    for round in 0..20u64 {
        let mut server = start(&s, None);
        // The kill lands after this many acknowledged writes, with three more in flight.
        let kill_after = rng.below(200) as usize;
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut writers = JoinSet::new();
        for lane in 0..4u64 {
            let (base, acked, done) = (server.base.clone(), acked.clone(), done.clone());
            writers.spawn(async move {
                let mut rng = Lcg(round * 1000 + lane);
                for i in 0..50u64 {
                    let outcome = match (i + lane) % 4 {
                        0 | 1 => {
                            let k = rng.below(VARIANTS);
                            let body = json!({"path": format!("v{k}")});
                            let sent = client()
                                .post(format!("{base}/admin/adapters/bot/versions"))
                                .bearer_auth(TOKEN)
                                .json(&body)
                                .send()
                                .await;
                            let Ok(resp) = sent else { return };
                            let Ok(v) = resp.json::<Value>().await else { return };
                            if let Some(version) = v["version"].as_u64() {
                                acked.lock().registered.insert(version, k);
                            }
                            Some(())
                        }
                        2 => {
                            let known: Vec<u64> = acked.lock().registered.keys().copied().collect();
                            if known.is_empty() {
                                continue;
                            }
                            let to = known[rng.below(known.len() as u64) as usize];
                            acked.lock().prod_tried.insert(to);
                            let sent = client()
                                .put(format!("{base}/admin/adapters/bot/aliases/prod"))
                                .bearer_auth(TOKEN)
                                .json(&json!({"version": to}))
                                .send()
                                .await;
                            let Ok(resp) = sent else { return };
                            if resp.status() == 200 {
                                acked.lock().prod_acked = Some(to);
                            }
                            Some(())
                        }
                        _ => {
                            let known: Vec<u64> = acked.lock().registered.keys().copied().collect();
                            if known.is_empty() {
                                continue;
                            }
                            let version = known[rng.below(known.len() as u64) as usize];
                            acked.lock().delete_tried.insert(version);
                            let url = format!("{base}/admin/adapters/bot/versions/{version}");
                            let Ok(resp) = client().delete(url).bearer_auth(TOKEN).send().await else { return };
                            if resp.status() == 200 {
                                acked.lock().deleted.insert(version);
                            }
                            Some(())
                        }
                    };
                    if outcome.is_some() {
                        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
        let started = Instant::now();
        while done.load(std::sync::atomic::Ordering::SeqCst) < kill_after && !writers.is_empty() {
            if writers.try_join_next().is_some() {
                continue;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "round {round}: the writes stalled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        server.kill();
        writers.join_all().await;
        eprintln!("round {round}: killed after {} acknowledged writes", done.load(std::sync::atomic::Ordering::SeqCst));

        assert_eq!(adapters::registry::verify(&root).unwrap(), Vec::<String>::new(), "round {round}");
        let snapshot = adapters::registry::read_snapshot(&root).unwrap();
        let acked = acked.lock();
        let Some(entry) = snapshot.adapter("bot") else {
            assert!(acked.registered.is_empty());
            continue;
        };
        for (version, k) in &acked.registered {
            if acked.deleted.contains(version) {
                assert!(!entry.versions.contains_key(version), "round {round}: deleted {version} is back");
            } else if acked.delete_tried.contains(version) && !entry.versions.contains_key(version) {
                // Its delete was in flight when the gateway died, and went through.
            } else {
                let manifest = entry.versions.get(version).unwrap_or_else(|| panic!("round {round}: lost {version}"));
                assert_eq!(manifest.sha256, hashes[*k as usize]);
            }
        }
        if acked.prod_acked.is_some() {
            let prod = entry.aliases["prod"].version;
            assert!(acked.prod_tried.contains(&prod), "round {round}: prod is on {prod}, never asked for");
        }
    }
    // The restarted gateway serves the registry as it was left.
    let server = start(&s, None);
    let (status, listing) = admin(&server.base, Method::GET, "/admin/adapters/bot", None).await;
    assert_eq!(status, 200);
    let have: BTreeSet<u64> =
        listing["versions"].as_array().unwrap().iter().filter_map(|m| m["version"].as_u64()).collect();
    let acked = acked.lock();
    let want: BTreeSet<u64> = acked.registered.keys().copied().filter(|v| !acked.delete_tried.contains(v)).collect();
    assert!(want.is_subset(&have), "acknowledged versions missing after restarts");
}
