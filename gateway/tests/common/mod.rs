//! Test support: starts the real `switchyard` binary on 127.0.0.1:0 and talks HTTP to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The default model, fetched by `scripts/fetch-models.sh`.
pub fn default_model() -> PathBuf {
    let path = std::env::var_os("SWITCHYARD_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(path.is_file(), "{} is missing: run scripts/fetch-models.sh first", path.display());
    path
}

pub const MODEL_ID: &str = "smollm2-135m-instruct";

/// The default embedding model directory, fetched by `scripts/fetch-models.sh`.
pub fn embed_model() -> PathBuf {
    let path = std::env::var_os("SWITCHYARD_TEST_EMBED_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2"));
    assert!(
        path.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-models.sh first",
        path.display()
    );
    path
}

pub const EMBED_MODEL_ID: &str = "all-MiniLM-L6-v2";

pub struct Server {
    child: Child,
    pub base: String,
    pub dir: tempfile::TempDir,
}

impl Server {
    /// Starts the gateway with the default model plus `args`, and waits for it to say `ready`.
    pub fn start(args: &[&str]) -> Server {
        let model = default_model();
        let mut all = vec!["--model".to_owned(), model.display().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        Self::start_raw(&all)
    }

    /// Starts the gateway with exactly `args` (plus `--auth off` unless they say otherwise).
    pub fn start_raw(args: &[String]) -> Server {
        Self::start_with_env(args, &[])
    }

    /// Like [`Server::start_raw`], with extra environment variables (secrets, for example).
    pub fn start_with_env(args: &[String], env: &[(&str, &str)]) -> Server {
        let mut args = args.to_vec();
        if !args.iter().any(|a| a == "--auth") {
            args.extend(["--auth".to_owned(), "off".to_owned()]);
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let log = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(&args)
            .env_remove("SWITCHYARD_MODEL")
            .env_remove("SWITCHYARD_EMBED_MODEL")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn switchyard");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut base = None;
        loop {
            let line = match rx.recv_timeout(Duration::from_secs(180)) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
                    panic!("switchyard did not become ready; stderr:\n{log}");
                }
            };
            if let Some(addr) = line.strip_prefix("switchyard listening on ") {
                base = Some(addr.to_owned());
            }
            if line == "switchyard ready" {
                break;
            }
        }
        Server { child, base: base.expect("listening line before ready"), dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        assert!(sent.success());
        self.child.wait().expect("wait for switchyard")
    }

    /// Sends SIGKILL: no drain, no clean-up, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HS256 JWT from `switchyard mint-token`.
pub fn mint_token(secret: &str, sub: &str, tenant: &str, role: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["mint-token", "--secret", secret, "--sub", sub, "--tenant", tenant, "--role", role])
        .output()
        .expect("mint-token");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(600)).build().expect("client")
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|frame| frame.strip_prefix("data: ")).map(str::to_owned).collect()
}

/// Reads one metric's value from a Prometheus text page.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
}

/// A Redis server of this test's own, so stopping it disturbs nobody else.
pub struct PrivateRedis {
    pub port: u16,
    child: std::process::Child,
}

impl PrivateRedis {
    pub fn start(port: u16) -> Self {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not start on {port}");
            std::thread::yield_now();
        }
        Self { port, child }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free loopback port for a private server.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Reads a metric's value from the line of `name` whose labels include all of `labels`.
pub fn metric_with(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let (label_part, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.trim_start()),
        };
        let has_all = labels.iter().all(|(k, v)| label_part.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
        if has_all {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}
