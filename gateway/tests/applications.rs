//! The application endpoints over HTTP with the default models (SmolLM2-135M-Instruct and
//! all-MiniLM-L6-v2): classification, templates and `/v1/generate`, knowledge bases with
//! files of every format and `/v1/qa`, recommendation; each one's bad inputs (a 4xx in the
//! OpenAI error shape, nothing stored), tenants kept apart, feedback on every task id, and
//! the per-task metrics.

mod common;

use common::{client, embed_model, metric_with, sse_data, Server, MODEL_ID};
use serde_json::{json, Value};
use sha2::Digest;

const SECRET: &str = "applications-test-secret-0123456789";
const ADMIN: &str = "applications-admin-token";

/// The chat and embedding models, auth on (JWTs) and the bootstrap admin token.
fn start(data: &std::path::Path) -> Server {
    let (embed, data) = (embed_model().display().to_string(), data.display().to_string());
    Server::start(&[
        "--embed-model",
        &embed,
        "--data-dir",
        &data,
        "--auth",
        "on",
        "--jwt-hs256-secret",
        SECRET,
        "--admin-token",
        ADMIN,
    ])
}

fn mint(sub: &str, tenant: &str) -> String {
    common::mint_token(SECRET, sub, tenant, "user")
}

async fn call(server: &Server, method: reqwest::Method, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method, server.url(path)).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn post(server: &Server, path: &str, token: &str, body: Value) -> (u16, Value) {
    call(server, reqwest::Method::POST, path, token, Some(body)).await
}

async fn get(server: &Server, path: &str, token: &str) -> (u16, Value) {
    call(server, reqwest::Method::GET, path, token, None).await
}

/// A 4xx in the OpenAI error shape, naming `param` when given.
fn assert_error(status: u16, body: &Value, want: u16, param: Option<&str>) {
    assert_eq!(status, want, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    if let Some(p) = param {
        assert_eq!(body["error"]["param"], p, "{body}");
    }
}

/// Gives feedback with a correction on `id` and checks it is accepted.
async fn correct(server: &Server, token: &str, id: &str, correction: &str) {
    let (status, fb) =
        post(server, "/v1/feedback", token, json!({"response_id": id, "thumbs": "down", "correction": correction}))
            .await;
    assert_eq!(status, 201, "feedback on {id}: {fb}");
}

#[tokio::test]
async fn classification_puts_the_right_label_on_top_and_takes_feedback() {
    let root = tempfile::tempdir().unwrap();
    let server = start(root.path());
    let alice = mint("alice", "acme");
    // Described labels: the small default model needs to be told what a label covers.
    let labels = json!([
        {"name": "sports", "description": "games, matches, teams and athletes"},
        {"name": "cooking", "description": "recipes, food and the kitchen"}]);
    let texts = [
        ("The striker scored twice in the final minutes and the team won the league match.", "sports"),
        ("Whisk the eggs with the sugar, fold in the flour and bake the cake for twenty minutes.", "cooking"),
        ("The goalkeeper saved a penalty and the fans cheered in the stadium.", "sports"),
        ("Simmer the tomato sauce with garlic and basil, then pour it over the pasta.", "cooking"),
    ];
    for (text, want) in texts {
        let (status, body) = post(&server, "/v1/classify", &alice, json!({"input": text, "labels": labels})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "classification");
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), 2);
        assert_eq!(results[0]["label"], want, "{text}: {body}");
        let sum: f64 = results.iter().map(|r| r["probability"].as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-6, "{body}");
        assert!(results[0]["probability"].as_f64() >= results[1]["probability"].as_f64());
        assert_eq!(body["truncated"], false);
    }
    // A list: one result list per input under `data`, each with its own id.
    let (status, body) =
        post(&server, "/v1/classify", &alice, json!({"input": [texts[0].0, texts[1].0], "labels": labels})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    assert_eq!(
        (data[0]["results"][0]["label"].as_str(), data[1]["results"][0]["label"].as_str()),
        (Some("sports"), Some("cooking"))
    );
    assert_ne!(data[0]["id"], data[1]["id"]);
    // Multi-label: every label on its own, probabilities need not sum to 1.
    let (status, body) =
        post(&server, "/v1/classify", &alice, json!({"input": texts[0].0, "labels": labels, "multi_label": true}))
            .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"].as_array().unwrap().len(), 2);
    // A long input is cut to max_input_tokens, and the response says so.
    let long = "The match went on. ".repeat(200);
    let (status, body) =
        post(&server, "/v1/classify", &alice, json!({"input": long, "labels": labels, "max_input_tokens": 64})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["truncated"], true);
    assert!(body["input_tokens"].as_u64().unwrap() > 64);
    // Feedback takes the id; a correction is the right label.
    let (_, body) = post(&server, "/v1/classify", &alice, json!({"input": texts[0].0, "labels": labels})).await;
    correct(&server, &alice, body["id"].as_str().unwrap(), "sports").await;
    // Bad input: a clear 4xx naming the field.
    for (bad, param) in [
        (json!({"input": "", "labels": labels}), Some("input")),
        (json!({"input": [], "labels": labels}), Some("input")),
        (json!({"input": "x", "labels": ["only"]}), Some("labels")),
        (json!({"input": "x", "labels": ["a", "A"]}), Some("labels[1]")),
        (json!({"input": "x", "labels": ["a", ""]}), Some("labels[1]")),
        (json!({"input": "x", "labels": ["a", {"name": "b", "colour": "red"}]}), None),
        (json!({"input": "x", "labels": labels, "max_input_tokens": 1}), Some("max_input_tokens")),
        (json!({"input": "x", "labels": labels, "temperature": 1}), None),
        (json!({"labels": labels}), None),
    ] {
        let (status, body) = post(&server, "/v1/classify", &alice, bad.clone()).await;
        assert_error(status, &body, 400, param);
    }
    let (status, body) =
        post(&server, "/v1/classify", &alice, json!({"input": "x", "labels": labels, "model": "nope@1"})).await;
    assert_error(status, &body, 404, Some("model"));
    let page = client().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metric_with(&page, "switchyard_task_requests_total", &[("task", "classify"), ("outcome", "ok")]).unwrap()
            >= 8.0
    );
    assert!(
        metric_with(&page, "switchyard_task_requests_total", &[("task", "classify"), ("outcome", "error")]).unwrap()
            >= 9.0
    );
}

#[tokio::test]
async fn templates_are_versioned_render_exactly_and_generate() {
    let root = tempfile::tempdir().unwrap();
    let server = start(root.path());
    let alice = mint("alice", "acme");
    let body = "Write a short thank-you note to {{ customer }} for buying {{ product }}.{% if rush %} Mention fast delivery.{% endif %}";
    let create = json!({
        "name": "thank-you", "template": body,
        "variables": ["customer", "product", {"name": "rush", "type": "boolean", "required": false}],
        "system": "You write polite customer letters.", "defaults": {"max_tokens": 24, "temperature": 0},
    });
    // Only admins create templates; a tenant's admin call names the tenant.
    let (status, err) = post(&server, "/admin/templates", &alice, create.clone()).await;
    assert_error(status, &err, 403, None);
    let (status, v1) = post(&server, "/admin/templates?tenant=acme", ADMIN, create.clone()).await;
    assert_eq!(status, 201, "{v1}");
    assert_eq!((v1["name"].as_str(), v1["version"].as_u64()), (Some("thank-you"), Some(1)));
    let mut second = create.clone();
    second["template"] = json!("Thank {{ customer }} for {{ product }}.{% if rush %}!{% endif %}");
    let (status, v2) = post(&server, "/admin/templates?tenant=acme", ADMIN, second).await;
    assert_eq!((status, v2["version"].as_u64()), (201, Some(2)), "{v2}");
    let (status, listed) =
        post(&server, "/admin/templates/thank-you/aliases?tenant=acme", ADMIN, json!({"alias": "prod", "version": 1}))
            .await;
    assert_eq!(status, 200, "{listed}");
    let (_, all) = get(&server, "/admin/templates?tenant=acme", ADMIN).await;
    assert_eq!(all["data"][0]["latest"], 2);
    assert_eq!(all["data"][0]["aliases"]["prod"], 1);

    // Generate through the alias: the rendered prompt's hash is exactly the expected text's.
    let (status, gen) = post(
        &server,
        "/v1/generate",
        &alice,
        json!({"template": "thank-you@prod", "variables": {"customer": "Ann", "product": "a kettle", "rush": true}}),
    )
    .await;
    assert_eq!(status, 200, "{gen}");
    let expected = "Write a short thank-you note to Ann for buying a kettle. Mention fast delivery.";
    assert_eq!(gen["prompt_sha256"], hex::encode(sha2::Sha256::digest(expected.as_bytes())));
    assert_eq!((gen["template"]["name"].as_str(), gen["template"]["version"].as_u64()), (Some("thank-you"), Some(1)));
    assert!(!gen["text"].as_str().unwrap().trim().is_empty(), "{gen}");
    assert!(gen["usage"]["completion_tokens"].as_u64().unwrap() <= 24, "{gen}");
    correct(&server, &alice, gen["id"].as_str().unwrap(), "Dear Ann, thank you for buying a kettle.").await;
    // The newest version by default; streamed: the start event carries the version and hash.
    let res = client()
        .post(server.url("/v1/generate"))
        .bearer_auth(&alice)
        .json(&json!({"template": "thank-you", "variables": {"customer": "Bo", "product": "tea"}, "stream": true, "max_tokens": 8}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = sse_data(&res.text().await.unwrap());
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!((first["object"].as_str(), first["template"]["version"].as_u64()), (Some("generation.start"), Some(2)));
    assert_eq!(first["prompt_sha256"], hex::encode(sha2::Sha256::digest("Thank Bo for tea.".as_bytes())));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let done: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(done["object"], "generation.done");

    // Bad variables name the variable; unknown templates are 404; another tenant sees none.
    for (vars, param) in [
        (json!({"product": "tea"}), "variables.customer"),
        (json!({"customer": "A", "product": "tea", "colour": "red"}), "variables.colour"),
        (json!({"customer": 7, "product": "tea"}), "variables.customer"),
        (json!({"customer": "A", "product": "tea", "rush": "yes"}), "variables.rush"),
    ] {
        let (status, err) =
            post(&server, "/v1/generate", &alice, json!({"template": "thank-you", "variables": vars})).await;
        assert_error(status, &err, 400, Some(param));
    }
    for name in ["nope", "thank-you@9", "thank-you@staging"] {
        let (status, err) = post(&server, "/v1/generate", &alice, json!({"template": name, "variables": {}})).await;
        assert_error(status, &err, 404, None);
    }
    let bob = mint("bob", "globex");
    let (status, err) = post(
        &server,
        "/v1/generate",
        &bob,
        json!({"template": "thank-you", "variables": {"customer": "A", "product": "b"}}),
    )
    .await;
    assert_error(status, &err, 404, None);
    // Bad templates store nothing.
    for (bad, param) in [
        (json!({"name": "x", "template": "Hi {{ who }}", "variables": []}), "variables"),
        (json!({"name": "x", "template": "Hi {{ who ", "variables": ["who"]}), "template"),
        (json!({"name": "Bad Name", "template": "Hi", "variables": []}), "name"),
        (json!({"name": "x", "template": "Hi {{ a }}", "variables": ["a", "a"]}), "variables[1]"),
    ] {
        let (status, err) = post(&server, "/admin/templates?tenant=acme", ADMIN, bad).await;
        assert_error(status, &err, 400, Some(param));
    }
    let (_, all) = get(&server, "/admin/templates?tenant=acme", ADMIN).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 1, "{all}");
}

/// A minimal one-page PDF whose content stream shows `text` in Helvetica.
fn pdf(text: &str) -> Vec<u8> {
    let stream = format!("BT /F1 12 Tf 72 720 Td ({text}) Tj ET");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_owned(),
        format!("<< /Length {} >>\nstream\n{stream}\nendstream", stream.len()),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_owned(),
    ];
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{o}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    out.extend_from_slice(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes());
    for o in offsets {
        out.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!("trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n", objects.len() + 1).as_bytes(),
    );
    out
}

/// A DOCX holding one paragraph per line of `text`.
fn docx(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default();
        zip.start_file("[Content_Types].xml", opts).unwrap();
        zip.write_all(br#"<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>"#).unwrap();
        zip.start_file("word/document.xml", opts).unwrap();
        let paragraphs: String = text.lines().map(|l| format!("<w:p><w:r><w:t>{l}</w:t></w:r></w:p>")).collect();
        zip.write_all(format!(r#"<?xml version="1.0"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>{paragraphs}</w:body></w:document>"#).as_bytes()).unwrap();
        zip.finish().unwrap();
    }
    buf.into_inner()
}

async fn upload(server: &Server, token: &str, kb: &str, name: &str, mime: &str, bytes: Vec<u8>) -> (u16, Value) {
    let part = reqwest::multipart::Part::bytes(bytes).file_name(name.to_owned()).mime_str(mime).unwrap();
    let form = reqwest::multipart::Form::new().part("file", part);
    let res = client()
        .post(server.url(&format!("/v1/knowledge-bases/{kb}/documents")))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn knowledge_bases_answer_with_citations_from_every_file_format() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let mut server = start(&data);
    let alice = mint("alice", "acme");
    let (status, kb) = post(&server, "/v1/knowledge-bases", &alice, json!({"name": "handbook"})).await;
    assert_eq!(status, 201, "{kb}");
    let kb = kb["id"].as_str().unwrap().to_owned();
    let docs = format!("/v1/knowledge-bases/{kb}/documents");
    let facts = [
        ("Office hours", "The Lisbon office opens at 8 am and closes at 6 pm on weekdays. On Saturdays it is closed."),
        ("Parking", "Employees park in the underground garage on level minus two. Visitors use the street meters."),
        (
            "Pump maintenance",
            "The infusion pump model IP-300 must be calibrated every 90 days by a certified technician.",
        ),
    ];
    let mut ids = Vec::new();
    for (title, text) in facts {
        let (status, doc) = post(&server, &docs, &alice, json!({"title": title, "text": text})).await;
        assert_eq!(status, 201, "{doc}");
        assert!(doc["chunks"].as_u64().unwrap() >= 1);
        ids.push(doc["id"].as_str().unwrap().to_owned());
    }
    // Every upload format becomes searchable text.
    let uploads = [
        ("refunds.txt", "text/plain", b"Refunds are paid within 14 days of the returned item arriving.".to_vec()),
        ("badges.md", "text/markdown", b"# Security badges\n\nLost badges are replaced at the reception desk for a fee of 10 euros.".to_vec()),
        ("canteen.html", "text/html", b"<html><head><title>Canteen</title></head><body><h1>Canteen</h1><p>The canteen serves lunch from noon until 2 pm.</p></body></html>".to_vec()),
        ("travel.pdf", "application/pdf", pdf("Train tickets for business travel are booked through the travel desk.")),
        ("laptops.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document", docx("Laptop policy\nLaptops are replaced every four years.")),
    ];
    for (name, mime, bytes) in uploads {
        let (status, doc) = upload(&server, &alice, &kb, name, mime, bytes).await;
        assert_eq!(status, 201, "{name}: {doc}");
        assert_eq!(doc["source"], name);
    }
    let (_, listed) = get(&server, &docs, &alice).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 8, "{listed}");
    let search = |q: &str| json!({"query": q, "k": 3});
    for (q, title) in [
        ("When is the canteen open for lunch?", "Canteen"),
        ("how are train tickets booked", "travel.pdf"),
        ("how often are laptops replaced", "laptops.docx"),
        ("lost badge replacement fee", "Security badges"),
    ] {
        let (status, hits) = post(&server, &format!("/v1/knowledge-bases/{kb}/search"), &alice, search(q)).await;
        assert_eq!(status, 200, "{hits}");
        assert_eq!(hits["data"][0]["title"], title, "{q}: {hits}");
    }

    // Q&A states the fact and cites first the document that holds it.
    let (status, qa) = post(
        &server,
        "/v1/qa",
        &alice,
        json!({"knowledge_base": kb, "question": "How often must the IP-300 infusion pump be calibrated?", "max_tokens": 48}),
    )
    .await;
    assert_eq!(status, 200, "{qa}");
    assert_eq!(qa["citations"][0]["document_id"], ids[2].as_str(), "{qa}");
    assert!(qa["answer"].as_str().unwrap().contains("90"), "{qa}");
    assert_eq!(qa["grounded"], true);
    correct(&server, &alice, qa["id"].as_str().unwrap(), "Every 90 days, by a certified technician.").await;
    // A question the documents do not cover: said so, no model call, nothing cited.
    let (status, qa) = post(
        &server,
        "/v1/qa",
        &alice,
        json!({"knowledge_base": kb, "question": "What is the boiling point of liquid nitrogen in kelvin?"}),
    )
    .await;
    assert_eq!(status, 200, "{qa}");
    assert_eq!(
        (qa["answer"].as_str(), qa["grounded"].as_bool()),
        (Some("The documents do not say."), Some(false)),
        "{qa}"
    );
    assert_eq!(qa["citations"].as_array().unwrap().len(), 0);
    assert_eq!(qa["usage"]["completion_tokens"], 0);
    // Streamed: citations in the first event, then the answer, then [DONE].
    let res = client()
        .post(server.url("/v1/qa"))
        .bearer_auth(&alice)
        .json(&json!({"knowledge_base": kb, "question": "What time does the office open?", "stream": true, "max_tokens": 32}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = sse_data(&res.text().await.unwrap());
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "qa.start");
    assert_eq!(first["citations"][0]["document_id"], ids[0].as_str(), "{first}");
    let text: String = events[1..]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|e| e["object"] == "qa.delta")
        .map(|e| e["delta"].as_str().unwrap().to_owned())
        .collect();
    assert!(text.contains('8'), "{text}");

    // Bad input: a clear 4xx, nothing stored.
    for (path, bad, param) in [
        ("/v1/knowledge-bases".to_owned(), json!({"name": " "}), Some("name")),
        (docs.clone(), json!({"title": "", "text": "x"}), Some("title")),
        (docs.clone(), json!({"title": "t", "text": "   "}), Some("text")),
        (docs.clone(), json!({"title": "t", "text": "x", "format": "rtf"}), Some("format")),
        (docs.clone(), json!({"title": "t", "text": "x", "metadata": [1]}), Some("metadata")),
        ("/v1/qa".to_owned(), json!({"knowledge_base": kb, "question": ""}), Some("question")),
        ("/v1/qa".to_owned(), json!({"knowledge_base": kb, "question": "q", "k": 0}), Some("k")),
        (format!("/v1/knowledge-bases/{kb}/search"), json!({"query": "q", "k": 500}), Some("k")),
    ] {
        let (status, err) = post(&server, &path, &alice, bad).await;
        assert_error(status, &err, 400, param);
    }
    let (status, err) =
        upload(&server, &alice, &kb, "scan.pdf", "application/pdf", b"%PDF-1.4 not really".to_vec()).await;
    assert_error(status, &err, 400, Some("file"));
    let (status, err) = upload(&server, &alice, &kb, "sheet.xlsx", "application/octet-stream", b"PK".to_vec()).await;
    assert_error(status, &err, 400, Some("file"));
    let (_, listed) = get(&server, &docs, &alice).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 8, "nothing stored by bad input");
    // Tenants see only their own knowledge bases.
    let bob = mint("bob", "globex");
    let (status, err) =
        post(&server, "/v1/qa", &bob, json!({"knowledge_base": kb, "question": "When does the office open?"})).await;
    assert_error(status, &err, 404, None);
    let (_, theirs) = get(&server, "/v1/knowledge-bases", &bob).await;
    assert_eq!(theirs["data"].as_array().unwrap().len(), 0);

    // Deleting a document takes it out of search; everything survives a restart.
    let (status, _) = call(&server, reqwest::Method::DELETE, &format!("{docs}/{}", ids[2]), &alice, None).await;
    assert_eq!(status, 200);
    server.terminate();
    let server = start(&data);
    let (_, listed) = get(&server, &docs, &alice).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 7);
    let (_, hits) =
        post(&server, &format!("/v1/knowledge-bases/{kb}/search"), &alice, search("infusion pump calibration")).await;
    assert!(hits["data"].as_array().unwrap().iter().all(|h| h["document_id"] != ids[2].as_str()), "{hits}");
    let (status, _) = call(&server, reqwest::Method::DELETE, &format!("/v1/knowledge-bases/{kb}"), &alice, None).await;
    assert_eq!(status, 200);
    let (status, err) = get(&server, &docs, &alice).await;
    assert_error(status, &err, 404, None);
}

#[tokio::test]
async fn recommendations_follow_what_a_user_bought() {
    let root = tempfile::tempdir().unwrap();
    let server = start(root.path());
    let alice = mint("alice", "acme");
    let items = [
        ("shoe-trail", "Trail running shoes with a grippy sole"),
        ("shoe-road", "Lightweight road running shoes for marathons"),
        ("shoe-spikes", "Track spikes running shoes for sprinters"),
        ("coffee-beans", "Dark roast espresso coffee beans"),
        ("coffee-grinder", "Burr grinder for coffee beans"),
        ("coffee-kettle", "Gooseneck kettle for pour-over coffee"),
    ];
    for (id, text) in items {
        let (status, item) = post(
            &server,
            "/v1/recommend/items",
            &alice,
            json!({"id": id, "text": text, "metadata": {"kind": id.split('-').next()}}),
        )
        .await;
        assert_eq!(status, 201, "{item}");
    }
    // Popularity: other users like the kettle most.
    for user in ["u1", "u2", "u3"] {
        let (status, e) = post(
            &server,
            "/v1/recommend/events",
            &alice,
            json!({"user": user, "item": "coffee-kettle", "event": "purchase"}),
        )
        .await;
        assert_eq!(status, 201, "{e}");
    }
    // A cold-start user gets the popular item, and the reason says so.
    let (status, rec) = post(&server, "/v1/recommend", &alice, json!({"user": "newbie", "k": 3})).await;
    assert_eq!(status, 200, "{rec}");
    assert_eq!(
        (rec["cold_start"].as_bool(), rec["items"][0]["id"].as_str()),
        (Some(true), Some("coffee-kettle")),
        "{rec}"
    );
    assert!(rec["items"][0]["reason"].as_str().unwrap().contains("popular"), "{rec}");
    // A user who bought running shoes gets an unseen pair of running shoes first.
    for item in ["shoe-trail", "shoe-road"] {
        post(&server, "/v1/recommend/events", &alice, json!({"user": "runner", "item": item, "event": "purchase"}))
            .await;
    }
    let (status, rec) =
        post(&server, "/v1/recommend", &alice, json!({"user": "runner", "k": 3, "exclude_seen": true})).await;
    assert_eq!(status, 200, "{rec}");
    assert_eq!(
        (rec["cold_start"].as_bool(), rec["items"][0]["id"].as_str()),
        (Some(false), Some("shoe-spikes")),
        "{rec}"
    );
    assert!(rec["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| !["shoe-trail", "shoe-road"].contains(&i["id"].as_str().unwrap())));
    correct(&server, &alice, rec["id"].as_str().unwrap(), "shoe-spikes").await;
    // A new event changes the next recommendation at once.
    for _ in 0..3 {
        post(
            &server,
            "/v1/recommend/events",
            &alice,
            json!({"user": "runner", "item": "coffee-beans", "event": "purchase"}),
        )
        .await;
    }
    let (_, rec) = post(
        &server,
        "/v1/recommend",
        &alice,
        json!({"user": "runner", "k": 2, "exclude_seen": true, "candidates": ["coffee-grinder", "shoe-spikes"]}),
    )
    .await;
    assert_eq!(rec["items"][0]["id"], "coffee-grinder", "{rec}");
    // With a model: it re-ranks the top candidates and explains.
    let (status, rec) =
        post(&server, "/v1/recommend", &alice, json!({"user": "runner", "k": 3, "model": MODEL_ID})).await;
    assert_eq!(status, 200, "{rec}");
    assert!(rec["explanation"].as_str().is_some(), "{rec}");
    // Bad input stores nothing; other tenants see nothing.
    for (path, bad, status_want, param) in [
        ("/v1/recommend/items", json!({"id": "", "text": "x"}), 400, Some("id")),
        ("/v1/recommend/items", json!({"id": "a", "text": "x", "metadata": 3}), 400, Some("metadata")),
        ("/v1/recommend/events", json!({"user": "u", "item": "missing", "event": "view"}), 404, None),
        ("/v1/recommend/events", json!({"user": "u", "item": "shoe-trail", "event": "teleport"}), 400, None),
        ("/v1/recommend/events", json!({"user": "u", "item": "shoe-trail", "event": "view", "weight": -1}), 400, None),
        ("/v1/recommend", json!({"user": "runner", "k": 0}), 400, None),
        ("/v1/recommend", json!({"user": "runner", "candidates": ["nope"]}), 400, Some("candidates")),
        ("/v1/recommend", json!({"user": "runner", "diversity": 2}), 400, Some("diversity")),
    ] {
        let (status, err) = post(&server, path, &alice, bad).await;
        assert_error(status, &err, status_want, param);
    }
    let bob = mint("bob", "globex");
    let (status, err) =
        post(&server, "/v1/recommend/events", &bob, json!({"user": "u", "item": "shoe-trail", "event": "view"})).await;
    assert_error(status, &err, 404, None);
    let (_, rec) = post(&server, "/v1/recommend", &bob, json!({"user": "u", "k": 3})).await;
    assert_eq!(rec["items"].as_array().unwrap().len(), 0, "{rec}");
    let page = client().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metric_with(&page, "switchyard_task_requests_total", &[("task", "recommend"), ("outcome", "ok")]).unwrap()
            >= 4.0
    );
}
