//! The console end to end in headless Chromium (Debian's `chromium` and `chromium-driver`,
//! driven over WebDriver), against a real gateway on 127.0.0.1:0 with the default model: sign
//! in; upload two adapter versions; promote one, then the other, and roll back, checking the
//! registry over HTTP after each; answer a prompt in the playground and send a correction;
//! accept it (and more) in the review queue; look at an uploaded dataset; start a training
//! job on the feedback and watch its loss chart receive points; sign out. A labeller sees only
//! the labelling page, labels an item of a queue there, and the server refuses them the admin
//! API.
//!
//! Each page's screenshot is written to `$CARGO_TARGET_TMPDIR/console-screenshots/` (and, with
//! `SWITCHYARD_SCREENSHOTS=<dir>`, there too: that is how `docs/console/` is refreshed).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, Server};
use fantoccini::{Client, ClientBuilder, Locator};
use finetune::sidecar::SidecarConfig;
use protocol::params::TrainArgs;
use serde_json::{json, Value};

const SECRET: &str = "console-browser-secret-0123456789";
const ADMIN: &str = "console-browser-admin-token";
const WAIT: Duration = Duration::from_secs(90);

/// chromedriver on a free port, killed with the test.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Self {
        let path = std::env::var("SWITCHYARD_TEST_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        assert!(
            Path::new(&path).is_file(),
            "{path} is missing: install Debian's chromium and chromium-driver (.ci/run does)"
        );
        let port = common::free_port();
        let child = Command::new(path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, port }
    }

    async fn browser(&self) -> Client {
        let chromium = std::env::var("SWITCHYARD_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,800", "--lang=en-US"],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mint(sub: &str, role: &str) -> String {
    common::mint_token(SECRET, sub, "acme", role)
}

async fn api(server: &Server, token: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method, server.url(path)).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

async fn prod_version(server: &Server) -> Option<u64> {
    let (_, adapter) = api(server, ADMIN, reqwest::Method::GET, "/admin/adapters/bot", None).await;
    adapter["aliases"]["prod"]["version"].as_u64()
}

/// Waits for an element, then clicks it. Pages re-render after each action, so an element
/// found just before a re-render is looked up again.
async fn click(c: &Client, css: &str) {
    let started = Instant::now();
    loop {
        let el = c.wait().at_most(WAIT).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
        match el.click().await {
            Ok(()) => return,
            Err(_) if started.elapsed() < WAIT => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("click {css}: {e}"),
        }
    }
}

/// Waits for an element, clears it and types into it (again if a re-render replaced it).
async fn fill(c: &Client, css: &str, text: &str) {
    let started = Instant::now();
    loop {
        let el = c.wait().at_most(WAIT).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
        let typed = async {
            el.clear().await?;
            el.send_keys(text).await
        };
        match typed.await {
            Ok(()) => return,
            Err(_) if started.elapsed() < WAIT => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("fill {css}: {e}"),
        }
    }
}

async fn text(c: &Client, css: &str) -> String {
    let started = Instant::now();
    loop {
        let el = c.wait().at_most(WAIT).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
        match el.text().await {
            Ok(t) => return t,
            Err(_) if started.elapsed() < WAIT => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("text of {css}: {e}"),
        }
    }
}

/// Polls `check` (a JS expression) until it is true.
async fn until(c: &Client, what: &str, check: &str) {
    let started = Instant::now();
    loop {
        let v = c.execute(&format!("return !!({check});"), vec![]).await.unwrap();
        if v == Value::Bool(true) {
            return;
        }
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls the server until `check` holds.
async fn until_api<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Confirms the dialog an action opened.
async fn confirm(c: &Client) {
    click(c, "#confirm[open] #confirm-yes").await;
}

fn screenshot_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")];
    if let Ok(extra) = std::env::var("SWITCHYARD_SCREENSHOTS") {
        dirs.push(PathBuf::from(extra));
    }
    dirs
}

async fn screenshot(c: &Client, name: &str) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let png = c.screenshot().await.unwrap();
    for dir in screenshot_dirs() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
    }
}

async fn chat(server: &Server, token: &str, text: &str) -> Value {
    let body = json!({"model": common::MODEL_ID, "messages": [{"role": "user", "content": text}], "max_tokens": 8});
    let (status, answer) = api(server, token, reqwest::Method::POST, "/v1/chat/completions", Some(body)).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_loop_runs_from_the_console() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let args: Vec<String> = [
        "--model",
        &common::default_model().display().to_string(),
        "--data-dir",
        &data.display().to_string(),
        "--auth",
        "on",
        "--jwt-hs256-secret",
        SECRET,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::start_with_env(&args, &[("SWITCHYARD_ADMIN_TOKEN", ADMIN)]);
    let shape = adapters::BaseModelShape::smollm2_135m();
    for (dir, seed) in [("v1", 1), ("v2", 2)] {
        runtime::testing::write_random_adapter(&root.path().join(dir), &shape, 4, seed, false).unwrap();
    }
    let driver = Driver::start();
    let c = driver.browser().await;

    // Sign in.
    c.goto(&server.url("/console")).await.unwrap();
    c.wait().at_most(WAIT).for_element(Locator::Css("#token")).await.unwrap();
    screenshot(&c, "sign-in").await;
    fill(&c, "#token", "wrong-token").await;
    click(&c, "#sign-in").await;
    until(&c, "the sign-in error", "document.getElementById('error')?.textContent.includes('invalid')").await;
    fill(&c, "#token", ADMIN).await;
    click(&c, "#sign-in").await;
    until(&c, "the signed-in header", "document.getElementById('role')?.textContent.includes('admin')").await;
    let cookies = c.get_all_cookies().await.unwrap();
    let session = cookies.iter().find(|k| k.name() == "switchyard_session").expect("a session cookie");
    assert_eq!(session.http_only(), Some(true));
    let exposed = c.execute("return document.cookie;", vec![]).await.unwrap();
    assert!(!exposed.as_str().unwrap().contains("switchyard_session"), "the page's script cannot read the cookie");
    assert!(!c.current_url().await.unwrap().as_str().contains(ADMIN), "the token is never in the URL");

    // Upload two versions.
    click(&c, "#nav-models").await;
    for dir in ["v1", "v2"] {
        fill(&c, "#upload-name", "bot").await;
        let files = root.path().join(dir);
        let config = c.find(Locator::Css("#upload-config")).await.unwrap();
        config.send_keys(&files.join("adapter_config.json").display().to_string()).await.unwrap();
        let weights = c.find(Locator::Css("#upload-weights")).await.unwrap();
        weights.send_keys(&files.join("adapter_model.safetensors").display().to_string()).await.unwrap();
        click(&c, "#upload").await;
        let version = if dir == "v1" { 1 } else { 2 };
        c.wait()
            .at_most(WAIT)
            .for_element(Locator::Css(&format!("[data-testid=promote-bot-{version}]")))
            .await
            .expect("the new version is listed");
    }
    let (_, adapter) = api(&server, ADMIN, reqwest::Method::GET, "/admin/adapters/bot", None).await;
    assert_eq!(adapter["versions"].as_array().map(Vec::len), Some(2), "{adapter}");

    // Promote 1, then 2, then roll back to 1: the registry says so after each.
    for version in [1u64, 2] {
        click(&c, &format!("[data-testid=promote-bot-{version}]")).await;
        let shown = text(&c, "#confirm-text").await;
        assert!(shown.contains(&format!("version {version}")), "the confirmation says what changes: {shown}");
        confirm(&c).await;
        until_api("prod to move", || async { prod_version(&server).await == Some(version) }).await;
    }
    screenshot(&c, "models").await;
    click(&c, "[data-testid=rollback-bot-prod]").await;
    confirm(&c).await;
    until_api("the rollback", || async { prod_version(&server).await == Some(1) }).await;
    // Someone else moves prod: the page's compare-and-set loses and says why.
    until(&c, "the page to show prod on 1", "!document.querySelector('[data-testid=promote-bot-2]')?.disabled").await;
    let (status, _) =
        api(&server, ADMIN, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", Some(json!({"version": 2})))
            .await;
    assert_eq!(status, 200);
    // The page still shows prod on 1, so it offers 2 and expects 1.
    click(&c, "[data-testid=promote-bot-2]").await;
    confirm(&c).await;
    until(&c, "the conflict explained", "document.getElementById('error')?.textContent.includes('moved')").await;
    assert_eq!(prod_version(&server).await, Some(2), "the lost compare-and-set changed nothing");

    // Playground: one prompt, two models side by side, then a correction.
    click(&c, "#nav-playground").await;
    fill(&c, "#prompt", "What is the capital of France?").await;
    click(&c, &format!("#model-a option[value='{}']", common::MODEL_ID)).await;
    click(&c, "#model-b option[value='bot@prod']").await;
    fill(&c, "#max-tokens", "12").await;
    click(&c, "#run").await;
    until(&c, "both answers", "document.getElementById('answer-a')?.textContent.trim().length > 0 && document.getElementById('answer-b')?.textContent.trim().length > 0 && !document.getElementById('run').disabled").await;
    let served = text(&c, "[data-testid=served-b]").await;
    assert!(served.contains("bot@2"), "the served version is shown: {served}");
    click(&c, "#thumbs-down-a").await;
    fill(&c, "#correction-a", "Paris.").await;
    click(&c, "#send-feedback-a").await;
    c.wait().at_most(WAIT).for_element(Locator::Css("[data-testid=feedback-sent-a]")).await.unwrap();
    screenshot(&c, "playground").await;
    let (_, pending) = api(&server, ADMIN, reqwest::Method::GET, "/admin/feedback?status=pending", None).await;
    let mine = pending["data"].as_array().unwrap().iter().find(|f| f["correction"] == "Paris.").cloned();
    let mine = mine.expect("the playground's correction is pending feedback");
    assert_eq!(mine["thumbs"], "down");
    let mine_id = mine["id"].as_str().unwrap().to_owned();

    // Review: accept it from the page; then more feedback (a user's, over the API) is
    // accepted in bulk, so training has enough examples.
    click(&c, "#nav-review").await;
    click(&c, &format!("[data-testid=accept-{mine_id}]")).await;
    until_api("the review", || async {
        let (_, list) = api(&server, ADMIN, reqwest::Method::GET, "/admin/feedback?status=accepted", None).await;
        list["data"].as_array().unwrap().iter().any(|f| f["id"] == mine_id.as_str())
    })
    .await;
    let user = mint("user-1", "user");
    for i in 0..6 {
        let answer = chat(&server, &user, &format!("Name a colour, please ({i}).")).await;
        let body = json!({"response_id": answer["id"], "thumbs": "down", "correction": "Blue."});
        let (status, _) = api(&server, &user, reqwest::Method::POST, "/v1/feedback", Some(body)).await;
        assert_eq!(status, 201);
    }
    c.refresh().await.unwrap();
    until(&c, "six pending items", "document.querySelectorAll('[data-testid^=accept-]').length >= 6").await;
    screenshot(&c, "review").await;
    click(&c, "#select-all").await;
    click(&c, "#bulk-accept").await;
    confirm(&c).await;
    until_api("the bulk accept", || async {
        let (_, list) = api(&server, ADMIN, reqwest::Method::GET, "/admin/feedback?status=pending", None).await;
        list["data"].as_array().unwrap().is_empty()
    })
    .await;

    // Datasets: an upload is parsed, previewed and curated.
    let rows: String = (0..12)
        .map(|i| format!("{}\n", json!({"instruction": format!("Say hello {i}"), "output": "Hello!"})))
        .chain(["{\"instruction\": \"mail me at ann@example.com\", \"output\": \"Sure.\"}\n".to_owned()])
        .collect();
    let file = root.path().join("hello.jsonl");
    std::fs::write(&file, rows).unwrap();
    click(&c, "#nav-datasets").await;
    let input = c.wait().at_most(WAIT).for_element(Locator::Css("#dataset-file")).await.unwrap();
    input.send_keys(&file.display().to_string()).await.unwrap();
    click(&c, "#dataset-upload").await;
    let id = text(&c, "[data-testid=dataset-id]").await;
    assert!(id.trim().starts_with("ds-"), "{id}");
    click(&c, &format!("[data-testid=dataset-{}]", id.trim())).await;
    until(&c, "the preview and its histogram", "document.querySelectorAll('#dataset-rows .row').length == 13 && document.querySelector('[data-testid=length-histogram] rect')").await;
    screenshot(&c, "datasets").await;

    // Training on the accepted feedback, followed live.
    click(&c, "#nav-training").await;
    c.wait().at_most(WAIT).for_element(Locator::Css("#param-lora_rank")).await.unwrap();
    let max = c.find(Locator::Css("#param-lora_rank")).await.unwrap().attr("max").await.unwrap();
    assert_eq!(max.as_deref(), Some("256"), "the form's range is the validation's");
    fill(&c, "#job-adapter", "bot").await;
    click(&c, "#job-dataset option[value='feedback']").await;
    fill(&c, "#param-max_steps", "6").await;
    fill(&c, "#param-batch_size", "2").await;
    fill(&c, "#param-lora_rank", "4").await;
    fill(&c, "#param-save_steps", "0").await;
    fill(&c, "#param-val_ratio", "0.2").await;
    screenshot(&c, "training-form").await;
    click(&c, "#job-start").await;
    until(&c, "the job page", "location.hash.startsWith('#/training/ftjob-')").await;
    let cfg = SidecarConfig {
        data_dir: data.clone(),
        base: common::default_model(),
        gateway: server.base.clone(),
        admin_token: ADMIN.into(),
        redis_url: None,
        adapter: "bot".into(),
        feedback_from: None,
        feedback_task: None,
        min_new_records: 1_000_000,
        poll: Duration::from_millis(200),
        promote_margin: None,
        args: TrainArgs::default(),
        curate: Default::default(),
        once: true,
        progress: false,
    };
    let sidecar = tokio::task::spawn_blocking(move || finetune::sidecar::run(&cfg));
    until(&c, "loss points", "document.querySelectorAll('[data-testid=loss-chart] circle.point').length >= 3").await;
    screenshot(&c, "training-live").await;
    sidecar.await.unwrap().unwrap();
    until(&c, "the job's end", "document.querySelector('[data-testid=job-state]')?.textContent == 'succeeded'").await;
    let points = c
        .execute("return document.querySelectorAll('[data-testid=loss-chart] circle.point').length;", vec![])
        .await
        .unwrap();
    assert_eq!(points.as_u64(), Some(6), "one point per step");
    until(&c, "the evaluation table", "document.querySelector('#job-eval')?.textContent.includes('candidate')").await;
    screenshot(&c, "training-done").await;
    let (_, jobs) = api(&server, ADMIN, reqwest::Method::GET, "/admin/finetune/jobs", None).await;
    assert_eq!(jobs["data"][0]["state"], "succeeded", "{jobs}");
    let candidate = jobs["data"][0]["version"].as_u64().unwrap();
    click(&c, &format!("[data-testid=promote-bot-{candidate}]")).await;
    confirm(&c).await;
    until_api("the candidate's promotion", || async { prod_version(&server).await == Some(candidate) }).await;

    // Traffic and audit show what happened.
    click(&c, "#nav-traffic").await;
    let panel = format!("document.querySelector('[data-testid=traffic-{}]')", common::MODEL_ID);
    until(&c, "a traffic chart", &format!("{panel}?.querySelector('svg')")).await;
    for i in 0..4 {
        chat(&server, &user, &format!("Tell me a fact about trains ({i}).")).await;
    }
    // The next poll charts them (requests per second over the interval, not zero).
    until(&c, "the traffic charted", &format!("{panel} && !/: 0 req\\/s/.test({panel}.textContent)")).await;
    screenshot(&c, "traffic").await;
    click(&c, "#nav-audit").await;
    until(&c, "the audit log", "document.getElementById('audit')?.textContent.includes('promote')").await;
    screenshot(&c, "audit").await;

    // Narrow screens work too.
    c.set_window_size(400, 800).await.unwrap();
    click(&c, "#nav-models").await;
    let overflow = c.execute("return document.documentElement.scrollWidth - window.innerWidth;", vec![]).await.unwrap();
    assert!(overflow.as_i64().unwrap() <= 0, "no horizontal scrolling at 400 px: {overflow}");
    screenshot(&c, "models-narrow").await;
    c.set_window_size(1280, 800).await.unwrap();

    // Sign out: the cookie is gone and the API no longer answers the page.
    click(&c, "#sign-out").await;
    c.wait().at_most(WAIT).for_element(Locator::Css("#token")).await.unwrap();
    let cookies = c.get_all_cookies().await.unwrap();
    assert!(cookies.iter().all(|k| k.name() != "switchyard_session" || k.value().is_empty()));
    let status = c
        .execute_async("const done = arguments[0]; fetch('/admin/adapters').then(r => done(r.status));", vec![])
        .await
        .unwrap();
    assert_eq!(status.as_u64(), Some(401));

    // A labeller: only the labelling page, where they label an item of a queue an admin made;
    // the admin API refuses them.
    let answer = chat(&server, &user, "What colour is the sky?").await;
    let body = json!({"response_id": answer["id"], "thumbs": "down", "correction": "Blue.", "tags": ["sky"]});
    let (_, fb) = api(&server, &user, reqwest::Method::POST, "/v1/feedback", Some(body)).await;
    let fb_id = fb["id"].as_str().unwrap().to_owned();
    let queue = json!({"rules": "Accept a correction only if it is right.", "filter": {"tag": "sky"}});
    let (status, _) = api(&server, ADMIN, reqwest::Method::PUT, "/admin/labelling/queues/sky", Some(queue)).await;
    assert_eq!(status, 200);
    fill(&c, "#token", &mint("lee", "labeller")).await;
    click(&c, "#sign-in").await;
    until(&c, "the labeller's page", "location.hash.startsWith('#/labelling')").await;
    click(&c, "[data-testid=open-queue-sky]").await;
    until(
        &c,
        "the item beside the rules",
        "document.querySelector('.rules')?.textContent.includes('only if it is right')",
    )
    .await;
    screenshot(&c, "labelling").await;
    click(&c, &format!("[data-testid=accept-{fb_id}]")).await;
    until_api("the label to settle the feedback", || async {
        let (_, list) =
            api(&server, ADMIN, reqwest::Method::GET, "/admin/feedback?status=accepted&tag=sky", None).await;
        list["data"].as_array().unwrap().iter().any(|f| f["id"] == fb_id.as_str())
    })
    .await;
    let nav = c.execute("return !!document.getElementById('nav-models') && document.getElementById('nav-models').offsetParent !== null;", vec![]).await.unwrap();
    assert_eq!(nav, Value::Bool(false), "no admin links for a labeller");
    c.goto(&server.url("/console#/models")).await.unwrap();
    c.wait().at_most(WAIT).for_element(Locator::Css("#not-allowed")).await.expect("admin pages say no");
    screenshot(&c, "labeller-refused").await;
    for path in ["/admin/adapters", "/admin/feedback", "/admin/finetune/jobs"] {
        let status = c
            .execute_async(&format!("const done = arguments[0]; fetch('{path}').then(r => done(r.status));"), vec![])
            .await
            .unwrap();
        assert_eq!(status.as_u64(), Some(403), "{path} for a labeller's session");
    }
    c.close().await.unwrap();
}
