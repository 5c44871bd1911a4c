//! Structured outputs, tool calls, log-probabilities and `n`, over HTTP with the real default
//! model on the candle engine: every constrained answer parses and validates (checked by an
//! independent JSON-schema validator), streamed and not, on the base and on an adapter, with
//! constrained and free rows in the same batches.

mod common;

use common::{client, metric, sse_data, Server, MODEL_ID};
use futures::future::join_all;
use serde_json::{json, Value};

const TOKEN: &str = "structured-admin-token";

/// Twenty schemas covering enums, nested objects, bounded arrays, required fields, string
/// patterns and ranged numbers.
fn schemas() -> Vec<Value> {
    let obj = |props: Value, required: &[&str]| json!({"type": "object", "properties": props, "required": required, "additionalProperties": false});
    vec![
        obj(
            json!({"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
            &["name", "age"],
        ),
        obj(json!({"color": {"enum": ["red", "green", "blue"]}}), &["color"]),
        json!({"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4}),
        obj(
            json!({"user": obj(json!({"id": {"type": "integer", "minimum": 1, "maximum": 1000},
                "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}), &["id", "email"])}),
            &["user"],
        ),
        obj(json!({"ok": {"type": "boolean"}}), &["ok"]),
        obj(json!({"temperature": {"type": "integer", "minimum": -50, "maximum": 60}}), &["temperature"]),
        obj(json!({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}), &["zip"]),
        obj(
            json!({"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": obj(json!({
                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 99}}), &["sku", "qty"])}}),
            &["items"],
        ),
        obj(json!({"version": {"const": 2}, "status": {"enum": ["ok", "error"]}}), &["version", "status"]),
        json!({"anyOf": [{"type": "integer", "minimum": 0, "maximum": 10}, {"type": "string", "maxLength": 10}]}),
        json!({"type": "string", "enum": ["yes", "no", "maybe"]}),
        obj(json!({"percent": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}}), &["percent"]),
        obj(
            json!({"title": {"type": "string", "maxLength": 30},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}}),
            &["title"],
        ),
        obj(json!({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}), &["date"]),
        obj(json!({"middle_name": {"type": ["string", "null"], "maxLength": 15}}), &["middle_name"]),
        json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}, "minItems": 3, "maxItems": 3}),
        json!({"$defs": {"point": obj(json!({"x": {"type": "integer", "minimum": -10, "maximum": 10},
                "y": {"type": "integer", "minimum": -10, "maximum": 10}}), &["x", "y"])},
            "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
            "required": ["from", "to"], "additionalProperties": false}),
        obj(
            json!({"sentiment": {"enum": ["positive", "negative", "neutral"]},
                "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}}),
            &["sentiment", "score"],
        ),
        obj(json!({"code": {"type": "string", "minLength": 4, "maxLength": 6, "pattern": "^[A-Z0-9]+$"}}), &["code"]),
        obj(
            json!({"matrix": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "array", "minItems": 2,
                "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}),
            &["matrix"],
        ),
    ]
}

async fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let res = client().post(server.url(path)).json(body).send().await.expect("request");
    let status = res.status().as_u16();
    let text = res.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text})))
}

/// A streamed chat answer: the content and tool-call deltas of each choice, joined, and the
/// finish reasons.
struct Streamed {
    content: Vec<String>,
    arguments: Vec<String>,
    names: Vec<String>,
    finish: Vec<String>,
    chunks: Vec<Value>,
}

async fn stream(server: &Server, path: &str, body: &Value) -> Streamed {
    let res = client().post(server.url(path)).json(body).send().await.expect("request");
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let mut s = Streamed { content: vec![], arguments: vec![], names: vec![], finish: vec![], chunks: vec![] };
    for d in data.iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(d).unwrap();
        for c in chunk["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            for v in [&mut s.content, &mut s.arguments, &mut s.names, &mut s.finish] {
                if v.len() <= i {
                    v.resize(i + 1, String::new());
                }
            }
            let delta = if c["delta"].is_object() { &c["delta"] } else { c };
            if let Some(t) = delta["content"].as_str().or(c["text"].as_str()) {
                s.content[i].push_str(t);
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                if let Some(n) = call["function"]["name"].as_str() {
                    s.names[i].push_str(n);
                }
                if let Some(a) = call["function"]["arguments"].as_str() {
                    s.arguments[i].push_str(a);
                }
            }
            if let Some(f) = c["finish_reason"].as_str() {
                s.finish[i] = f.to_owned();
            }
        }
        s.chunks.push(chunk);
    }
    s
}

fn validate(schema: &Value, text: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("does not parse ({e}): {text}"))?;
    let validator = jsonschema::validator_for(schema).map_err(|e| format!("bad test schema: {e}"))?;
    let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
    if errors.is_empty() {
        Ok(value)
    } else {
        Err(format!("{text} is invalid: {errors:?}"))
    }
}

/// A server with one adapter, `tuned@1`, and no prefix cache: twin requests (whole and
/// streamed) then compute their prompts alike, so greedy answers match to the bit.
fn start_with_adapter() -> (Server, tempfile::TempDir) {
    let root = tempfile::tempdir().unwrap();
    let imports = root.path().join("imports");
    let shape = adapters::BaseModelShape::smollm2_135m();
    runtime::testing::write_random_adapter(&imports.join("v1"), &shape, 4, 10, false).unwrap();
    let server = Server::start(&[
        "--engine",
        "candle",
        "--max-concurrent",
        "128",
        "--prefix-cache-mb",
        "0",
        "--admin-token",
        TOKEN,
        "--import-root",
        &imports.display().to_string(),
        "--data-dir",
        &root.path().join("data").display().to_string(),
    ]);
    (server, root)
}

async fn register_adapter(server: &Server) {
    let res = client()
        .post(server.url("/admin/adapters/tuned/versions"))
        .bearer_auth(TOKEN)
        .json(&json!({"path": "v1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
}

fn schema_request(model: &str, schema: &Value, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("Reply with a JSON value that matches this schema: {schema}")}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": true}},
        "temperature": 0, "max_tokens": 160, "stream": stream,
    })
}

#[tokio::test]
async fn twenty_schemas_validate_streamed_and_not_on_the_base_and_an_adapter_beside_free_rows() {
    let (server, _root) = start_with_adapter();
    register_adapter(&server).await;
    let free = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Name three rivers in Europe."}],
        "temperature": 0, "max_tokens": 40});
    let (_, alone) = post(&server, "/v1/chat/completions", &free).await;

    let schemas = schemas();
    assert_eq!(schemas.len(), 20);
    // Every schema on both models, whole and streamed, and free requests, all at once: the
    // engine batches constrained and free rows into the same steps.
    let bodies: Vec<(Value, Value)> = [MODEL_ID, "tuned@1"]
        .iter()
        .flat_map(|model| schemas.iter().map(|s| (schema_request(model, s, false), schema_request(model, s, true))))
        .collect();
    let whole: Vec<_> = bodies.iter().map(|(w, _)| post(&server, "/v1/chat/completions", w)).collect();
    let streamed: Vec<_> = bodies.iter().map(|(_, s)| stream(&server, "/v1/chat/completions", s)).collect();
    let frees = join_all((0..8).map(|_| post(&server, "/v1/chat/completions", &free)));
    let (whole, streamed, frees) = tokio::join!(join_all(whole), join_all(streamed), frees);

    let mut failures = Vec::new();
    for (i, ((status, body), s)) in whole.iter().zip(&streamed).enumerate() {
        let schema = &schemas[i % 20];
        assert_eq!(*status, 200, "{body}");
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{text}");
        if let Err(e) = validate(schema, text) {
            failures.push(format!("schema {} whole: {e}", i % 20));
        }
        if let Err(e) = validate(schema, &s.content[0]) {
            failures.push(format!("schema {} streamed: {e}", i % 20));
        }
        assert_eq!(s.content[0], text, "streamed deltas join to the whole answer (schema {})", i % 20);
        assert_eq!(s.finish[0], "stop");
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // Free rows beside the constrained ones answer exactly as they do alone.
    for (status, body) in frees {
        assert_eq!(status, 200);
        assert_eq!(body["choices"][0]["message"]["content"], alone["choices"][0]["message"]["content"]);
    }
    // Batches really mixed them, and each schema compiled once (the repeats came from the cache).
    let page = client().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metric(&page, "switchyard_batch_size_sum").unwrap()
            > metric(&page, "switchyard_batch_size_count").unwrap() * 4.0
    );
    let compiled = metric(&page, "switchyard_grammar_compile_seconds_count").unwrap();
    assert_eq!(compiled, 20.0, "each of the 20 schemas is compiled once and then cached");
}

#[tokio::test]
async fn json_object_guided_choice_regex_and_completions_are_constrained() {
    let server = Server::start(&["--engine", "candle"]);
    let chat = |extra: Value| {
        let mut body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Is the sky blue? Answer."}],
            "temperature": 0, "max_tokens": 60});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let (s, body) =
        post(&server, "/v1/chat/completions", &chat(json!({"response_format": {"type": "json_object"}}))).await;
    assert_eq!(s, 200);
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(text).unwrap().is_object(), "{text}");

    let (_, body) = post(&server, "/v1/chat/completions", &chat(json!({"guided_choice": ["yes", "no"]}))).await;
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text == "yes" || text == "no", "{text}");

    let (_, body) = post(&server, "/v1/chat/completions", &chat(json!({"guided_regex": "[0-9]{3}-[0-9]{4}"}))).await;
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(regex_like_phone(text), "{text}");

    let completion = json!({"model": MODEL_ID, "prompt": "The answer, as JSON:", "temperature": 0, "max_tokens": 60,
        "guided_json": {"type": "object", "properties": {"answer": {"enum": ["a", "b"]}}, "required": ["answer"]}});
    let (_, body) = post(&server, "/v1/completions", &completion).await;
    let text = body["choices"][0]["text"].as_str().unwrap();
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(v["answer"] == "a" || v["answer"] == "b", "{v}");
    // Streamed completions join to the same text.
    let mut streamed = completion.clone();
    streamed["stream"] = json!(true);
    assert_eq!(stream(&server, "/v1/completions", &streamed).await.content[0], text);
}

fn regex_like_phone(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 8 && b[3] == b'-' && b.iter().enumerate().all(|(i, c)| i == 3 || c.is_ascii_digit())
}

#[tokio::test]
async fn bad_schemas_tools_and_ranges_are_400s_naming_the_parameter() {
    let server = Server::start(&["--engine", "candle"]);
    let user = json!([{"role": "user", "content": "hi"}]);
    let tool = json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}});
    let cases = vec![
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": true}}}}),
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}}),
            "response_format.json_schema.schema",
            "strin",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}}),
            "response_format.json_schema.schema",
            "schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
            "response_format.json_schema.name",
            "name",
        ),
        (json!({"response_format": {"type": "yaml"}}), "response_format.type", "json_schema"),
        (json!({"guided_regex": "(unclosed"}), "guided_regex", "guided_regex"),
        (json!({"guided_choice": []}), "guided_choice", "guided_choice"),
        (json!({"guided_json": "not json"}), "guided_json", "guided_json"),
        (json!({"guided_json": {"type": "object"}, "guided_regex": "a"}), "guided_regex", "only one"),
        (
            json!({"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}),
            "guided_json",
            "response_format",
        ),
        (json!({"tools": {"type": "function"}}), "tools", "list"),
        (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type", "function"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "has space"}}]}),
            "tools[0].function.name",
            "letters",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}),
            "tools[0].function.parameters",
            "schema",
        ),
        (json!({"tools": [tool, tool]}), "tools[1].function.name", "repeats"),
        (json!({"tools": [tool], "tool_choice": "sometimes"}), "tool_choice", "tool_choice"),
        (
            json!({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
            "nope",
        ),
        (json!({"tool_choice": "required"}), "tool_choice", "tools"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}], "tool_choice": "required"}),
            "tools",
            "not",
        ),
        (
            json!({"tools": [tool, {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "if": {}}}}]}),
            "tools[1].function.parameters",
            "if",
        ),
        (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs", "20"),
        (json!({"logprobs": true, "top_logprobs": -1}), "top_logprobs", "0"),
        (json!({"top_logprobs": 3}), "top_logprobs", "logprobs"),
        (json!({"n": 0}), "n", "16"),
        (json!({"n": 17}), "n", "16"),
        (json!({"response_format": {"type": "json_object"}, "ignore_eos": true}), "ignore_eos", "grammar"),
    ];
    for (extra, param, mentions) in cases {
        let mut body = json!({"model": MODEL_ID, "messages": user, "max_tokens": 4});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, err) = post(&server, "/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{extra} -> {err}");
        assert_eq!(err["error"]["param"], param, "{extra} -> {err}");
        assert_eq!(err["error"]["type"], "invalid_request_error");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(mentions), "{extra}: the message should mention {mentions}: {message}");
    }
    for (extra, param) in [
        (json!({"logprobs": 6}), "logprobs"),
        (json!({"logprobs": -1}), "logprobs"),
        (json!({"guided_choice": ["a", 3]}), "guided_choice[1]"),
    ] {
        let mut body = json!({"model": MODEL_ID, "prompt": "hi", "max_tokens": 4});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, err) = post(&server, "/v1/completions", &body).await;
        assert_eq!((status, err["error"]["param"].as_str()), (400, Some(param)), "{extra} -> {err}");
    }
    // Still healthy.
    assert_eq!(client().get(server.url("/health")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn tool_calls_named_required_auto_streamed_and_answered() {
    let server = Server::start(&["--engine", "candle"]);
    let weather = json!({"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": false});
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": weather}},
        {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"], "additionalProperties": false}}}
    ]);
    let ask = json!([{"role": "user", "content": "What is the weather in Paris right now?"}]);
    let named = json!({"model": MODEL_ID, "messages": ask, "tools": tools, "temperature": 0, "max_tokens": 80,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
    let (status, body) = post(&server, "/v1/chat/completions", &named).await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null(), "{choice}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments = call["function"]["arguments"].as_str().unwrap();
    validate(&weather, arguments).unwrap();

    // Streamed: the tool-call deltas join to the same call.
    let mut s_named = named.clone();
    s_named["stream"] = json!(true);
    let s = stream(&server, "/v1/chat/completions", &s_named).await;
    assert_eq!(
        (s.names[0].as_str(), s.arguments[0].as_str(), s.finish[0].as_str()),
        ("get_weather", arguments, "tool_calls")
    );
    let first_call = s.chunks.iter().find_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array().cloned()).unwrap();
    assert!(first_call[0]["id"].as_str().unwrap().starts_with("call_") && first_call[0]["index"] == 0);

    // `required`: one or more calls of the given functions, each valid for its own schema.
    let required = json!({"model": MODEL_ID, "messages": ask, "tools": tools, "temperature": 0, "max_tokens": 120,
        "tool_choice": "required"});
    let (_, body) = post(&server, "/v1/chat/completions", &required).await;
    let calls = body["choices"][0]["message"]["tool_calls"].as_array().unwrap_or_else(|| panic!("{body}"));
    assert!(!calls.is_empty());
    for c in calls {
        let name = c["function"]["name"].as_str().unwrap();
        let schema = tools.as_array().unwrap().iter().find(|t| t["function"]["name"] == name).unwrap()["function"]
            ["parameters"]
            .clone();
        validate(&schema, c["function"]["arguments"].as_str().unwrap()).unwrap();
    }
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");

    // The call and its result go back in the next request, and the model answers in text.
    let follow = json!({"model": MODEL_ID, "tools": tools, "temperature": 0, "max_tokens": 30, "messages": [
        {"role": "user", "content": "What is the weather in Paris right now?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature\": 21, \"sky\": \"clear\"}"}
    ]});
    let (status, body) = post(&server, "/v1/chat/completions", &follow).await;
    assert_eq!(status, 200, "{body}");
    let message = &body["choices"][0]["message"];
    assert!(message["content"].is_string() || message["tool_calls"].is_array(), "{body}");

    // `auto` answers with text or calls, never both broken: whatever comes back is well formed.
    let auto = json!({"model": MODEL_ID, "messages": ask, "tools": tools, "temperature": 0, "max_tokens": 80});
    let (_, body) = post(&server, "/v1/chat/completions", &auto).await;
    let c = &body["choices"][0];
    match c["finish_reason"].as_str().unwrap() {
        "tool_calls" => assert!(c["message"]["tool_calls"].as_array().is_some_and(|v| !v.is_empty())),
        _ => assert!(c["message"]["content"].is_string(), "{c}"),
    }
    let mut s_auto = auto.clone();
    s_auto["stream"] = json!(true);
    let s = stream(&server, "/v1/chat/completions", &s_auto).await;
    assert_eq!(s.finish[0], c["finish_reason"].as_str().unwrap());
    if c["finish_reason"] == "stop" {
        assert_eq!(s.content[0], c["message"]["content"].as_str().unwrap());
    }
}

/// One position's log-softmax over the vocabulary.
type Row = Vec<f64>;

/// Greedy decoding from the runtime directly: each step's log-softmax, to hold the server's
/// log-probabilities against.
struct Reference {
    runtime: runtime::llama::Runtime,
    config: runtime::llama::LlamaConfig,
}

impl Reference {
    fn load() -> Self {
        let chat = runtime::llama::ChatModel::load(&common::default_model()).unwrap();
        let runtime = runtime::llama::Runtime::from_llama(&chat.model, 2).unwrap();
        let config = runtime.config.clone();
        Self { runtime, config }
    }

    /// Log-softmax rows for every position of `prompt` (all_logits) and then `steps` greedy tokens.
    fn run(&self, prompt: &[u32], steps: usize) -> (Vec<Row>, Vec<(u32, Row)>) {
        use runtime::llama::{KvCache, SeqInput, Workspace};
        let mut ws = Workspace::default();
        let mut cache = KvCache::new(&self.config, prompt.len() + steps + 1);
        let mut logits = Vec::new();
        let vocab = self.config.vocab_size;
        let mut input = [SeqInput { tokens: prompt, cache: &mut cache, adapter: None, logits: true, all_logits: true }];
        self.runtime.forward(&mut ws, &mut input, &mut logits).unwrap();
        let rows: Vec<Vec<f64>> = logits.chunks_exact(vocab).map(log_softmax).collect();
        let mut last = rows.last().unwrap().clone();
        let mut decoded = Vec::new();
        for _ in 0..steps {
            let next = argmax(&last) as u32;
            decoded.push((next, last.clone()));
            let mut input =
                [SeqInput { tokens: &[next], cache: &mut cache, adapter: None, logits: true, all_logits: false }];
            self.runtime.forward(&mut ws, &mut input, &mut logits).unwrap();
            last = log_softmax(&logits[..vocab]);
        }
        (rows, decoded)
    }
}

fn log_softmax(l: &[f32]) -> Vec<f64> {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    l.iter().map(|&x| x as f64 - lse).collect()
}

fn argmax(v: &[f64]) -> usize {
    v.iter().enumerate().fold((0, f64::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0
}

fn top(v: &[f64], k: usize) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    s.truncate(k);
    s
}

#[tokio::test]
async fn logprobs_match_the_runtimes_log_softmax() {
    let server = Server::start(&["--engine", "candle"]);
    let reference = Reference::load();
    let messages = json!([{"role": "user", "content": "Write a short sentence about the moon."}]);
    let (_, tokenized) = post(&server, "/tokenize", &json!({"model": MODEL_ID, "messages": messages})).await;
    let prompt: Vec<u32> = tokenized["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    let steps = 12;
    let (prompt_rows, decoded) = reference.run(&prompt, steps);

    // Chat: each token and its top 5.
    let body = json!({"model": MODEL_ID, "messages": messages, "temperature": 0, "max_tokens": steps,
        "logprobs": true, "top_logprobs": 5});
    let (status, answer) = post(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let content = answer["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), steps, "one entry per generated token");
    for (entry, (token, row)) in content.iter().zip(&decoded) {
        let lp = entry["logprob"].as_f64().unwrap();
        assert!((lp - row[*token as usize]).abs() < 1e-4, "{lp} vs {}", row[*token as usize]);
        let tops: Vec<f64> =
            entry["top_logprobs"].as_array().unwrap().iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        for (a, b) in tops.iter().zip(top(row, 5)) {
            assert!((a - b).abs() < 1e-4, "top {a} vs {b}");
        }
        assert_eq!(tops.len(), 5);
        let bytes: Vec<u8> = entry["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(String::from_utf8_lossy(&bytes), entry["token"].as_str().unwrap());
    }
    // Streamed chunks carry the same entries.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let s = stream(&server, "/v1/chat/completions", &streamed).await;
    let from_chunks: Vec<Value> = s
        .chunks
        .iter()
        .flat_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned().unwrap_or_default())
        .collect();
    // (The streamed request's prompt came from the prefix cache, whose last token runs through
    // the decode kernels: the same values to within float rounding.)
    assert_eq!(from_chunks.len(), content.len());
    for (a, b) in from_chunks.iter().zip(content) {
        assert_eq!(a["token"], b["token"]);
        assert!((a["logprob"].as_f64().unwrap() - b["logprob"].as_f64().unwrap()).abs() < 1e-4);
    }

    // Completions with echo: the prompt's own log-probabilities (the first has none).
    let text_prompt = "The moon is";
    let (_, tokenized) = post(&server, "/tokenize", &json!({"model": MODEL_ID, "prompt": text_prompt})).await;
    let ids: Vec<u32> = tokenized["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    let (rows, decoded) = reference.run(&ids, 4);
    let body = json!({"model": MODEL_ID, "prompt": text_prompt, "temperature": 0, "max_tokens": 4, "logprobs": 3, "echo": true});
    let (status, answer) = post(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let choice = &answer["choices"][0];
    assert!(choice["text"].as_str().unwrap().starts_with(text_prompt));
    let lps = choice["logprobs"]["token_logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), ids.len() + 4);
    assert!(lps[0].is_null());
    for i in 1..ids.len() {
        let want = rows[i - 1][ids[i] as usize];
        assert!((lps[i].as_f64().unwrap() - want).abs() < 1e-4, "prompt token {i}");
    }
    for (j, (token, row)) in decoded.iter().enumerate() {
        assert!((lps[ids.len() + j].as_f64().unwrap() - row[*token as usize]).abs() < 1e-4);
    }
    assert_eq!(choice["logprobs"]["text_offset"][0], 0);
    let _ = prompt_rows;
}

#[tokio::test]
async fn n_choices_share_one_prompt_and_replay_with_a_seed() {
    let server = Server::start(&["--engine", "candle"]);
    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Give me a name for a cat."}],
        "temperature": 1.0, "seed": 42, "n": 4, "max_tokens": 16});
    let (status, a) = post(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{a}");
    let choices = a["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    let texts: Vec<&str> = choices.iter().map(|c| c["message"]["content"].as_str().unwrap()).collect();
    let (_, b) = post(&server, "/v1/chat/completions", &body).await;
    let again: Vec<&str> =
        b["choices"].as_array().unwrap().iter().map(|c| c["message"]["content"].as_str().unwrap()).collect();
    assert_eq!(texts, again, "the same seed gives the same four choices");
    let distinct: std::collections::HashSet<_> = texts.iter().collect();
    assert!(distinct.len() >= 2, "four samples at temperature 1 differ: {texts:?}");
    // The prompt is counted once; the completions add up.
    let (_, one) = post(&server, "/v1/chat/completions", &json!({"model": MODEL_ID,
        "messages": [{"role": "user", "content": "Give me a name for a cat."}], "temperature": 1.0, "seed": 42, "max_tokens": 16})).await;
    assert_eq!(a["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);
    // Choice 0 is what n=1 gives with the same seed.
    assert_eq!(one["choices"][0]["message"]["content"], texts[0]);

    // Streamed: chunks carry each choice's index and join to the same four texts.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let s = stream(&server, "/v1/chat/completions", &streamed).await;
    assert_eq!(s.content.iter().map(String::as_str).collect::<Vec<_>>(), texts);
    let usage = s.chunks.iter().find(|c| !c["usage"].is_null()).unwrap()["usage"].clone();
    assert_eq!(usage["completion_tokens"], a["usage"]["completion_tokens"]);
    // Completions take n too.
    let (_, c) = post(
        &server,
        "/v1/completions",
        &json!({"model": MODEL_ID, "prompt": "Once upon a time", "n": 3,
        "temperature": 0.9, "seed": 7, "max_tokens": 8}),
    )
    .await;
    assert_eq!(c["choices"].as_array().unwrap().len(), 3);
    // Echoed, streamed, with log-probabilities: every choice starts with the prompt and its
    // tokens' log-probabilities, the first of them null.
    let echo = json!({"model": MODEL_ID, "prompt": "Once upon a time", "n": 2, "temperature": 0.9, "seed": 7,
        "max_tokens": 4, "echo": true, "logprobs": 1, "stream": true});
    let s = stream(&server, "/v1/completions", &echo).await;
    assert_eq!(s.content.len(), 2);
    for (i, text) in s.content.iter().enumerate() {
        assert!(text.starts_with("Once upon a time"), "choice {i}: {text}");
        let first = s.chunks.iter().find(|c| c["choices"][0]["index"] == i).unwrap();
        assert!(first["choices"][0]["logprobs"]["token_logprobs"][0].is_null(), "{first}");
    }
}

#[tokio::test]
async fn a_template_with_its_own_tool_format_gets_the_tools_and_calls_as_openai_sent_them() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-tools");
    runtime::testing::write_tiny_llama(&model, 3).unwrap();
    // A template that reads `tools`, assistant `tool_calls` and `tool` turns itself.
    let template = "{% if tools %}<|im_start|> tools {% for t in tools %}{{ t['function']['name'] }} {% endfor %}<|im_end|> {% endif %}\
        {% for m in messages %}<|im_start|> {{ m['role'] }} {% if m['tool_calls'] %}{% for c in m['tool_calls'] %}{{ c['function']['name'] }} {{ c['function']['arguments']['x'] }} {% endfor %}{% else %}{{ m['content'] }} {% endif %}<|im_end|> {% endfor %}\
        {% if add_generation_prompt %}<|im_start|> assistant {% endif %}";
    let config_path = model.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["chat_template"] = json!(template);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let server =
        Server::start_raw(&["--model".to_owned(), model.display().to_string(), "--engine".into(), "candle".into()]);
    let tools = json!([
        {"type": "function", "function": {"name": "cat", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "dog", "parameters": {"type": "object"}}}
    ]);
    let body = json!({"model": "tiny-tools", "max_tokens": 1, "tools": tools, "messages": [
        {"role": "user", "content": "what is it ?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "cat", "arguments": "{\"x\": \"red\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "blue"}
    ]});
    let (status, answer) = post(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    // The model read exactly the template's own rendering: tool names, the call with its
    // arguments as an object, and the tool turn.
    let expected = "<|im_start|> tools cat dog <|im_end|> <|im_start|> user what is it ? <|im_end|> \
        <|im_start|> assistant cat red <|im_end|> <|im_start|> tool blue <|im_end|> <|im_start|> assistant ";
    let (_, tokenized) = post(&server, "/tokenize", &json!({"model": "tiny-tools", "prompt": expected})).await;
    assert_eq!(answer["usage"]["prompt_tokens"], tokenized["count"], "{answer}");
    // Without tools the same template renders the plain conversation.
    let (_, plain) = post(
        &server,
        "/v1/chat/completions",
        &json!({"model": "tiny-tools", "max_tokens": 1,
        "messages": [{"role": "user", "content": "what is it ?"}]}),
    )
    .await;
    let (_, tokenized) = post(
        &server,
        "/tokenize",
        &json!({"model": "tiny-tools",
        "prompt": "<|im_start|> user what is it ? <|im_end|> <|im_start|> assistant "}),
    )
    .await;
    assert_eq!(plain["usage"]["prompt_tokens"], tokenized["count"]);
}
