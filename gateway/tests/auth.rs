//! Authentication over HTTP: every JWT failure is a 401, users stay off admin routes, a
//! token's model list hides the rest, and API keys work alongside tokens.

mod common;

use common::{client, Server};
use serde_json::{json, Value};

const SECRET: &str = "a-test-secret-of-reasonable-length";

fn mint(extra: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "mint-token",
            "--secret",
            SECRET,
            "--sub",
            "alice",
            "--tenant",
            "acme",
            "--issuer",
            "switchyard-tests",
            "--audience",
            "gateway",
        ])
        .args(extra)
        .output()
        .expect("mint-token");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Signs arbitrary claims and headers, for the forged cases.
fn sign(claims: Value, secret: &str, alg: jsonwebtoken::Algorithm) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn b64(v: &Value) -> String {
    use std::fmt::Write;
    // base64url without padding, by hand: small and dependency-free for a test.
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = serde_json::to_vec(v).unwrap();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            let _ = write!(out, "{}", T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

async fn status_of(server: &Server, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut req = match &body {
        Some(b) => client().post(server.url(path)).json(b),
        None => client().get(server.url(path)),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn jwt_failures_roles_model_lists_and_api_keys() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    runtime::testing::write_tiny_llama(&model, 9).unwrap();
    let keys = root.path().join("keys.json");
    let api_key = "sk-test-0123456789";
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard")).args(["hash-api-key", api_key]).output().unwrap();
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    std::fs::write(
        &keys,
        json!([{"sha256": hash, "sub": "ci-bot", "tenant": "acme", "role": "user", "models": ["tiny-*"]}]).to_string(),
    )
    .unwrap();
    let args: Vec<String> = [
        "--model",
        &model.display().to_string(),
        "--data-dir",
        &root.path().join("data").display().to_string(),
        "--auth",
        "on",
        "--jwt-hs256-secret",
        SECRET,
        "--jwt-issuer",
        "switchyard-tests",
        "--jwt-audience",
        "gateway",
        "--api-keys-file",
        &keys.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::start_raw(&args);
    let chat = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2});

    // A good token works; public routes need none.
    let good = mint(&[]);
    assert_eq!(status_of(&server, "/v1/chat/completions", Some(&good), Some(chat.clone())).await.0, 200);
    for path in ["/health", "/ready", "/metrics", "/openapi.json", "/docs/"] {
        let res = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
    }

    // Every failure is the same 401 in the OpenAI shape.
    let t = now();
    let base = json!({"sub": "mallory", "tenant": "acme", "role": "admin", "iss": "switchyard-tests", "aud": "gateway", "exp": t + 600});
    let with = |k: &str, v: Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    let unsigned = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&base));
    let failures = [
        ("missing header", None),
        ("forged signature", Some(sign(base.clone(), "another-secret-entirely", jsonwebtoken::Algorithm::HS256))),
        ("alg none", Some(unsigned)),
        ("another algorithm", Some(sign(base.clone(), SECRET, jsonwebtoken::Algorithm::HS512))),
        ("expired", Some(sign(with("exp", json!(t - 3600)), SECRET, jsonwebtoken::Algorithm::HS256))),
        ("not yet valid", Some(sign(with("nbf", json!(t + 3600)), SECRET, jsonwebtoken::Algorithm::HS256))),
        ("wrong audience", Some(sign(with("aud", json!("elsewhere")), SECRET, jsonwebtoken::Algorithm::HS256))),
        ("wrong issuer", Some(sign(with("iss", json!("someone")), SECRET, jsonwebtoken::Algorithm::HS256))),
        ("garbage", Some("not.a.jwt".to_owned())),
    ];
    for (case, token) in &failures {
        let (status, body) = status_of(&server, "/v1/chat/completions", token.as_deref(), Some(chat.clone())).await;
        assert_eq!(status, 401, "{case}: {body}");
        assert_eq!(body["error"]["code"], "invalid_api_key", "{case}");
        assert_eq!(
            body["error"]["message"], "missing or invalid bearer token",
            "{case} says no more than a client needs"
        );
    }

    // A user token on an admin route: 403. An admin token: through.
    assert_eq!(status_of(&server, "/admin/adapters", Some(&good), None).await.0, 403);
    let admin = mint(&["--role", "admin"]);
    assert_eq!(status_of(&server, "/admin/adapters", Some(&admin), None).await.0, 200);

    // A model outside the token's list does not exist for it.
    let narrow = mint(&["--models", "support-*"]);
    let (status, body) = status_of(&server, "/v1/chat/completions", Some(&narrow), Some(chat.clone())).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("model_not_found")));
    let (_, models) = status_of(&server, "/v1/models", Some(&narrow), None).await;
    assert_eq!(models["data"].as_array().unwrap().len(), 0);

    // The static API key, stored only as its hash, acts with its own claims.
    assert_eq!(status_of(&server, "/v1/chat/completions", Some(api_key), Some(chat.clone())).await.0, 200);
    assert_eq!(status_of(&server, "/admin/adapters", Some(api_key), None).await.0, 403);

    // Refusals are counted by reason.
    let page = client().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for reason in [
        "missing",
        "bad_signature",
        "wrong_algorithm",
        "expired",
        "not_yet_valid",
        "wrong_audience",
        "wrong_issuer",
        "not_admin",
    ] {
        let v = common::metric(&page, &format!("switchyard_auth_failures_total{{reason=\"{reason}\"}}"));
        assert!(v.is_some_and(|v| v >= 1.0), "{reason} not counted:\n{page}");
    }
}

#[test]
fn auth_on_without_any_key_refuses_to_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--port", "0", "--auth", "on", "--model", "/nonexistent.gguf"])
        .env_remove("SWITCHYARD_JWT_HS256_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SWITCHYARD_AUTH=off"));
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn sign_with_pem(claims: &Value, alg: jsonwebtoken::Algorithm, pem: &str, kid: Option<&str>) -> String {
    let pem = std::fs::read(fixture(pem)).unwrap();
    let key = match alg {
        jsonwebtoken::Algorithm::ES256 => jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
    };
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// RS256 and ES256 public keys from PEM files, and RS256 keys from a JWKS file: the right
/// private key gets in; another key, another algorithm, the public key used as an HS256
/// secret, and (for JWKS) an unknown or missing `kid` all get the same 401.
#[tokio::test]
async fn public_key_algorithms_from_pem_and_jwks_files() {
    use jsonwebtoken::Algorithm::{ES256, HS256, RS256};
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    runtime::testing::write_tiny_llama(&model, 9).unwrap();
    let claims = json!({"sub": "svc", "tenant": "acme", "role": "user", "exp": now() + 600});
    let public_rsa = std::fs::read_to_string(fixture("rsa-public.pem")).unwrap();
    let confused = sign(claims.clone(), &public_rsa, HS256);
    // (flag, key file, [(case, token, expected status)])
    type Setup<'a> = (&'a str, &'a str, Vec<(&'a str, String, u16)>);
    let setups: [Setup<'_>; 3] = [
        (
            "--jwt-rs256-public-key",
            "rsa-public.pem",
            vec![
                ("matching RSA key", sign_with_pem(&claims, RS256, "rsa-private.pem", None), 200),
                ("another RSA key", sign_with_pem(&claims, RS256, "rsa-other-private.pem", None), 401),
                ("ES256 token", sign_with_pem(&claims, ES256, "ec-private.pem", None), 401),
                ("public key as HS256 secret", confused.clone(), 401),
            ],
        ),
        (
            "--jwt-es256-public-key",
            "ec-public.pem",
            vec![
                ("matching EC key", sign_with_pem(&claims, ES256, "ec-private.pem", None), 200),
                ("RS256 token", sign_with_pem(&claims, RS256, "rsa-private.pem", None), 401),
                ("HS256 token", sign(claims.clone(), SECRET, HS256), 401),
            ],
        ),
        (
            "--jwt-jwks-file",
            "jwks.json",
            vec![
                ("key named by kid", sign_with_pem(&claims, RS256, "rsa-private.pem", Some("test-rsa")), 200),
                ("unknown kid", sign_with_pem(&claims, RS256, "rsa-private.pem", Some("other")), 401),
                ("no kid", sign_with_pem(&claims, RS256, "rsa-private.pem", None), 401),
                ("right kid, wrong key", sign_with_pem(&claims, RS256, "rsa-other-private.pem", Some("test-rsa")), 401),
                ("public key as HS256 secret", confused.clone(), 401),
            ],
        ),
    ];
    for (flag, file, cases) in setups {
        let args: Vec<String> = [
            "--model",
            &model.display().to_string(),
            "--data-dir",
            &root.path().join(file).display().to_string(),
            "--auth",
            "on",
            flag,
            &fixture(file),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let server = Server::start_raw(&args);
        for (case, token, want) in cases {
            let (status, body) = status_of(&server, "/v1/models", Some(&token), None).await;
            assert_eq!(status, want, "{flag}: {case}: {body}");
            if want == 401 {
                assert_eq!(body["error"]["code"], "invalid_api_key", "{flag}: {case}");
            }
        }
    }
}
