//! The Responses API over HTTP with the real default model: plain, structured and
//! function-calling responses, the typed stream events, stored responses per tenant,
//! `previous_response_id`, bad input, and the official `openai` Python client (chat options
//! and the Responses streaming helper; `scripts/test.sh` installs it in a venv outside the
//! clone and names its python in `SWITCHYARD_TEST_OPENAI_PYTHON`).

mod common;

use common::{client, Server, MODEL_ID};
use serde_json::{json, Value};

fn hash(key: &str) -> String {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard")).args(["hash-api-key", key]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

const ACME: &str = "sk-acme-0123456789";
const GLOBEX: &str = "sk-globex-0123456789";

fn start(root: &std::path::Path) -> Server {
    let keys = root.join("keys.json");
    std::fs::write(
        &keys,
        json!([
            {"sha256": hash(ACME), "sub": "acme-app", "tenant": "acme", "role": "user"},
            {"sha256": hash(GLOBEX), "sub": "globex-app", "tenant": "globex", "role": "user"}
        ])
        .to_string(),
    )
    .unwrap();
    let args: Vec<String> = [
        "--model",
        &common::default_model().display().to_string(),
        "--engine",
        "candle",
        "--data-dir",
        &root.join("data").display().to_string(),
        "--auth",
        "on",
        "--api-keys-file",
        &keys.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Server::start_raw(&args)
}

async fn post(server: &Server, key: &str, body: &Value) -> (u16, Value) {
    let res = client().post(server.url("/v1/responses")).bearer_auth(key).json(body).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

async fn get(server: &Server, key: &str, id: &str) -> (u16, Value) {
    let res = client().get(server.url(&format!("/v1/responses/{id}"))).bearer_auth(key).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

fn output_text(r: &Value) -> String {
    r["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().unwrap().iter())
        .filter_map(|c| c["text"].as_str())
        .collect()
}

/// The events of a streamed response: (event line, data).
async fn events(server: &Server, key: &str, body: &Value) -> Vec<(String, Value)> {
    let res = client().post(server.url("/v1/responses")).bearer_auth(key).json(body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = res.text().await.unwrap();
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut event = String::new();
            let mut data = Value::Null;
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap();
                }
            }
            (event, data)
        })
        .collect()
}

#[tokio::test]
async fn responses_plain_streamed_stored_per_tenant_and_continued() {
    let root = tempfile::tempdir().unwrap();
    let server = start(root.path());
    let body = json!({"model": MODEL_ID, "instructions": "Answer in one short sentence.",
        "input": "What is the capital of France?", "max_output_tokens": 24, "temperature": 0});
    let (status, r) = post(&server, ACME, &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "response");
    assert!(r["id"].as_str().unwrap().starts_with("resp_"));
    assert!(matches!(r["status"].as_str(), Some("completed" | "incomplete")));
    assert_eq!(r["output"][0]["type"], "message");
    assert_eq!(r["output"][0]["role"], "assistant");
    assert_eq!(r["output"][0]["content"][0]["type"], "output_text");
    let text = output_text(&r);
    assert!(!text.is_empty());
    let usage = &r["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap()
    );

    // Stored, for its own tenant only.
    let id = r["id"].as_str().unwrap();
    let (status, stored) = get(&server, ACME, id).await;
    assert_eq!((status, &stored), (200, &r));
    let (status, err) = get(&server, GLOBEX, id).await;
    assert_eq!(status, 404, "another tenant must not see it: {err}");
    assert_eq!(err["error"]["code"], "not_found");
    assert_eq!(get(&server, ACME, "resp_doesnotexist").await.0, 404);
    assert_eq!(get(&server, ACME, "../../etc/passwd").await.0, 404);
    let mut unstored = body.clone();
    unstored["store"] = json!(false);
    let (_, u) = post(&server, ACME, &unstored).await;
    assert_eq!(get(&server, ACME, u["id"].as_str().unwrap()).await.0, 404, "store: false keeps nothing");

    // Streamed: typed events in OpenAI's order, deltas joining to the same text.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let evs = events(&server, ACME, &streamed).await;
    let kinds: Vec<&str> = evs.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        &kinds[..4],
        ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    );
    let tail = &kinds[kinds.len() - 4..];
    assert_eq!(tail[1..], ["response.content_part.done", "response.output_item.done", "response.completed"][..]);
    assert!(tail[0] == "response.output_text.done");
    for (i, (e, d)) in evs.iter().enumerate() {
        assert_eq!(&d["type"], e);
        assert_eq!(d["sequence_number"], i);
    }
    let deltas: String = evs
        .iter()
        .filter(|(e, _)| e == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, text, "the streamed deltas join to the non-streamed answer");
    let completed = &evs.last().unwrap().1["response"];
    assert_eq!(output_text(completed), text);
    let (status, _) = get(&server, ACME, completed["id"].as_str().unwrap()).await;
    assert_eq!(status, 200, "a streamed response is stored too");

    // previous_response_id continues the conversation (its earlier turns count as input).
    let follow = json!({"model": MODEL_ID, "previous_response_id": id, "input": "And of Italy?",
        "max_output_tokens": 16, "temperature": 0});
    let (status, f) = post(&server, ACME, &follow).await;
    assert_eq!(status, 200, "{f}");
    assert!(f["usage"]["input_tokens"].as_u64().unwrap() > usage["input_tokens"].as_u64().unwrap());
    assert_eq!(f["previous_response_id"], id);
    let (status, err) = post(&server, GLOBEX, &follow).await;
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("previous_response_id")));
}

#[tokio::test]
async fn responses_structured_tools_and_bad_input() {
    let root = tempfile::tempdir().unwrap();
    let server = start(root.path());
    let schema = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "maxLength": 20}}, "required": ["city", "country"], "additionalProperties": false});
    let body = json!({"model": MODEL_ID, "input": "Name a city and its country as JSON.", "temperature": 0,
        "max_output_tokens": 60, "text": {"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": true}}});
    let (status, r) = post(&server, ACME, &body).await;
    assert_eq!(status, 200, "{r}");
    let v: Value = serde_json::from_str(&output_text(&r)).unwrap();
    assert!(v["city"].is_string() && v["country"].is_string(), "{v}");
    assert_eq!(r["text"]["format"]["type"], "json_schema");

    // A forced function call is a function_call item with valid arguments.
    let tools = json!([{"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"], "additionalProperties": false}}]);
    let call = json!({"model": MODEL_ID, "input": "What is the weather in Oslo?", "tools": tools,
        "tool_choice": {"type": "function", "name": "get_weather"}, "temperature": 0, "max_output_tokens": 40});
    let (status, r) = post(&server, ACME, &call).await;
    assert_eq!(status, 200, "{r}");
    let item = r["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap_or_else(|| panic!("{r}"))
        .clone();
    assert_eq!(item["name"], "get_weather");
    let args: Value = serde_json::from_str(item["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string());
    // Streamed, the arguments arrive as deltas that join to the same text.
    let mut streamed = call.clone();
    streamed["stream"] = json!(true);
    let evs = events(&server, ACME, &streamed).await;
    let joined: String = evs
        .iter()
        .filter(|(e, _)| e == "response.function_call_arguments.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(joined, item["arguments"].as_str().unwrap());
    assert!(evs.iter().any(|(e, _)| e == "response.function_call_arguments.done"));
    // The call's output goes back in and the model answers.
    let answer = json!({"model": MODEL_ID, "previous_response_id": r["id"], "tools": tools, "temperature": 0,
        "max_output_tokens": 24, "input": [{"type": "function_call_output", "call_id": item["call_id"], "output": "{\"sky\": \"clear\"}"}]});
    let (status, a) = post(&server, ACME, &answer).await;
    assert_eq!(status, 200, "{a}");

    for (extra, param) in [
        (json!({"input": []}), "input"),
        (json!({"input": [{"role": "robot", "content": "x"}]}), "input[0].role"),
        (json!({"input": [{"type": "input_image", "image_url": "x"}]}), "input[0].type"),
        (json!({"text": {"format": {"type": "json_schema", "schema": {}}}}), "text.format.name"),
        (
            json!({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "not": {}}}}}),
            "text.format.schema",
        ),
        (json!({"tools": [{"type": "web_search"}]}), "tools[0].type"),
        (json!({"max_output_tokens": 0}), "max_output_tokens"),
        (json!({"temperature": 9}), "temperature"),
        (json!({"previous_response_id": "resp_nothing"}), "previous_response_id"),
        (json!({"modalities": ["audio"]}), "modalities"),
    ] {
        let mut b = json!({"model": MODEL_ID, "input": "hi"});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, err) = post(&server, ACME, &b).await;
        assert_eq!((status, err["error"]["param"].as_str()), (400, Some(param)), "{extra} -> {err}");
    }
    let res = client().post(server.url("/v1/responses")).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 401, "no key, no response");
}

#[test]
fn the_official_openai_python_client_works() {
    let Some(python) = std::env::var_os("SWITCHYARD_TEST_OPENAI_PYTHON") else {
        eprintln!("the client check did not run: set SWITCHYARD_TEST_OPENAI_PYTHON to a python with `openai` (scripts/test.sh does)");
        return;
    };
    let server = Server::start(&["--engine", "candle"]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openai_client.py");
    let out = std::process::Command::new(python).arg(script).arg(server.url("/v1")).arg(MODEL_ID).output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.stderr()
    );
}
