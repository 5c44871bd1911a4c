//! The files in `deploy/` make a working server as deploy/README.md installs them: the example
//! config and the systemd units' command lines, with only paths and secrets substituted, start
//! a gateway that authenticates, serves, keeps its data where the config says, and a sidecar
//! that runs against it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{client, default_model, Server};
use serde_json::{json, Value};

const SECRET: &str = "deploy-test-jwt-secret-of-some-length";
const ADMIN: &str = "deploy-test-admin-token";

fn deploy(file: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)).unwrap()
}

/// `ExecStart=` of a unit, split into words, with the install paths moved under `root`.
fn exec_start(unit: &str, root: &Path) -> Vec<String> {
    let line = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("the unit has ExecStart");
    line.split_whitespace().map(|w| w.replace("/var/lib/switchyard", &root.display().to_string())).collect()
}

fn mint(claims_role: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["mint-token", "--sub", "deploy-test", "--role", claims_role])
        .args(["--issuer", "https://auth.example.internal", "--audience", "switchyard"])
        .env("SWITCHYARD_JWT_HS256_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn the_example_config_and_units_make_a_working_gateway_and_sidecar() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("var-lib-switchyard");
    std::fs::create_dir_all(state.join("models")).unwrap();
    std::os::unix::fs::symlink(default_model(), state.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let config = deploy("switchyard.toml").replace("/var/lib/switchyard", &state.display().to_string());
    let config_path = root.path().join("switchyard.toml");
    std::fs::write(&config_path, config).unwrap();

    // The gateway unit's command line, with the config moved and the test's own address.
    let unit = exec_start(&deploy("switchyard.service"), &state);
    assert_eq!(unit[1..3], ["serve", "--config"]);
    let mut args: Vec<String> = vec!["--config".into(), config_path.display().to_string()];
    // The config says auth on; the flag repeats it so the test helper does not switch it off.
    args.extend(["--auth".into(), "on".into()]);
    let secrets = [("SWITCHYARD_JWT_HS256_SECRET", SECRET), ("SWITCHYARD_ADMIN_TOKEN", ADMIN)];
    let server = Server::start_with_env(&args, &secrets);

    let res = client().get(server.url("/v1/models")).send().await.unwrap();
    assert_eq!(res.status(), 401, "auth is on");
    let token = mint("user");
    let models: Value =
        client().get(server.url("/v1/models")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2-135m-instruct");
    let body =
        json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let res = client().post(server.url("/v1/chat/completions")).bearer_auth(&token).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    // The candle engine serves the adapter API, and the registry lives where data_dir says.
    let res = client().get(server.url("/admin/adapters")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(state.join("data/registry").is_dir() && state.join("data/feedback").is_dir());

    // The sidecar unit's command line against this gateway runs and keeps running.
    // The unit points at the gateway on 127.0.0.1:8080; the test's listens elsewhere.
    let sidecar_unit: Vec<String> = exec_start(&deploy("switchyard-sidecar.service"), &state)
        .into_iter()
        .map(|w| w.replace("http://127.0.0.1:8080", &server.base))
        .collect();
    let finetune = PathBuf::from(env!("CARGO_BIN_EXE_switchyard")).with_file_name("finetune");
    assert!(finetune.is_file(), "{} is built with the workspace", finetune.display());
    let mut sidecar = Command::new(finetune)
        .args(&sidecar_unit[1..])
        .args(["--poll-seconds", "1"])
        .env("SWITCHYARD_ADMIN_TOKEN", ADMIN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It takes a queued job: a small dataset through the admin API, then watch its state move.
    let rows: String =
        (0..8).map(|i| format!("{}\n", json!({"instruction": format!("say {i}"), "output": "ok"}))).collect();
    let upload =
        client().post(server.url("/admin/finetune/datasets")).bearer_auth(ADMIN).body(rows).send().await.unwrap();
    assert_eq!(upload.status(), 201);
    let dataset: Value = upload.json().await.unwrap();
    let job = json!({"adapter": "support-bot", "dataset": {"kind": "uploaded", "id": dataset["id"]}, "params": {"epochs": 1, "lora_rank": 2, "save_steps": 0}});
    let res = client().post(server.url("/admin/finetune/jobs")).bearer_auth(ADMIN).json(&job).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let job: Value = res.json().await.unwrap();
    let url = server.url(&format!("/admin/finetune/jobs/{}", job["id"].as_str().unwrap()));
    let started = std::time::Instant::now();
    loop {
        let now: Value = client().get(&url).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
        if now["state"] != "queued" {
            break;
        }
        if let Some(status) = sidecar.try_wait().unwrap() {
            let out = sidecar.wait_with_output().unwrap();
            panic!("the sidecar exited ({status}): {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the sidecar never took the job: {now}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = sidecar.kill();
    let _ = sidecar.wait();
}
