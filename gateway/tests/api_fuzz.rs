//! A schema-driven fuzzer (schemathesis) against the served OpenAPI spec: no request it makes
//! may get a server error, a status the spec does not list for that route, or a content type
//! the spec does not list. `scripts/test.sh` installs schemathesis in a venv outside the clone
//! and names its `st` in `SWITCHYARD_TEST_SCHEMATHESIS`; CI runs it through that script.

mod common;

use std::process::Command;

use common::Server;

const TOKEN: &str = "fuzz-admin-token";

#[test]
fn the_served_spec_holds_under_a_schema_driven_fuzzer() {
    let Some(st) = std::env::var_os("SWITCHYARD_TEST_SCHEMATHESIS") else {
        eprintln!(
            "the fuzzer did not run: set SWITCHYARD_TEST_SCHEMATHESIS to schemathesis's `st` (scripts/test.sh does)"
        );
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    runtime::testing::write_tiny_llama(&model, 5).unwrap();
    let imports = root.path().join("imports");
    std::fs::create_dir_all(&imports).unwrap();
    let args: Vec<String> = [
        "--model",
        &model.display().to_string(),
        "--data-dir",
        &root.path().join("data").display().to_string(),
        "--admin-token",
        TOKEN,
        "--import-root",
        &imports.display().to_string(),
        // `/v1/embeddings` serves the real model (the spec's example names it).
        "--embed-model",
        &common::embed_model().display().to_string(),
        // Keep generation short whatever max_tokens the fuzzer picks.
        "--context-len",
        "256",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::start_raw(&args);
    let report = root.path().join("report");
    let output = Command::new(st)
        .arg("run")
        .arg(server.url("/openapi.json"))
        .args(["--url", &server.base])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance"])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        // One worker: Python 3.11's ast.parse is not thread-safe ("AST constructor recursion depth
        // mismatch"), and hypothesis parses lambda sources while it generates.
        .args(["--max-examples", "25", "--seed", "1", "--workers", "1", "--no-color"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--request-timeout", "20"])
        // Nothing is kept between runs, and nothing is written into the clone.
        .args(["--generation-database", "none"])
        .current_dir(root.path())
        .env("PWD", root.path())
        .arg("--report-dir")
        .arg(&report)
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}\nserver log:\n{}",
        server.stderr()
    );
}
