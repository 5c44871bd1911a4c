//! Feedback with a real Redis: two replicas take feedback on each other's answers once, a
//! consumer group reads every record exactly once, and records posted while Redis is down are
//! spooled and replayed when it is back.

mod common;

use common::{client, free_port, PrivateRedis, Server};
use protocol::names::{FEEDBACK_STREAM, STREAM_FIELD};
use protocol::Envelope;
use redis::AsyncCommands;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn start(root: &std::path::Path, model: &std::path::Path, dir: &str, redis: &str) -> Server {
    let args: Vec<String> = [
        "--model",
        &model.display().to_string(),
        "--data-dir",
        &root.join(dir).display().to_string(),
        "--redis-url",
        redis,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Server::start_raw(&args)
}

async fn answer(server: &Server) -> String {
    let chat = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "the dog"}], "max_tokens": 2});
    let v: Value =
        client().post(server.url("/v1/chat/completions")).json(&chat).send().await.unwrap().json().await.unwrap();
    v["id"].as_str().unwrap().to_owned()
}

async fn feedback(server: &Server, id: &str) -> u16 {
    let body = json!({"response_id": id, "thumbs": "down", "correction": "A dog."});
    client().post(server.url("/v1/feedback")).json(&body).send().await.unwrap().status().as_u16()
}

/// Response ids of the feedback records the group has not read yet, acknowledging them.
async fn read_group(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let opts = redis::streams::StreamReadOptions::default().group("trainer", "t1").count(100);
    let reply: redis::streams::StreamReadReply = conn.xread_options(&[FEEDBACK_STREAM], &[">"], &opts).await.unwrap();
    let mut ids = Vec::new();
    for key in reply.keys {
        for entry in key.ids {
            let json: String = entry.get(STREAM_FIELD).unwrap();
            match Envelope::from_json(&json).unwrap() {
                Envelope::Feedback(f) => ids.push(f.record.response_id),
                other => panic!("only feedback is posted here, got {other:?}"),
            }
            let _: i64 = conn.xack(FEEDBACK_STREAM, "trainer", &[&entry.id]).await.unwrap();
        }
    }
    ids
}

async fn group(port: u16) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: Result<(), _> = conn.xgroup_create_mkstream(FEEDBACK_STREAM, "trainer", "0").await;
    conn
}

#[tokio::test]
async fn replicas_share_feedback_through_a_stream_and_spool_while_redis_is_down() {
    let port = free_port();
    let mut redis = PrivateRedis::start(port);
    let url = format!("redis://127.0.0.1:{port}");
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    runtime::testing::write_tiny_llama(&model, 6).unwrap();
    let a = start(root.path(), &model, "a", &url);
    let b = start(root.path(), &model, "b", &url);
    let mut conn = group(port).await;

    // An answer from A takes feedback on B (B learns the id from Redis), and only once.
    let id = answer(&a).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match feedback(&b, &id).await {
            201 => break,
            // A records the id in Redis just after answering; B may ask first.
            404 => assert!(Instant::now() < deadline, "B never learned of A's answer"),
            other => panic!("feedback on B answered {other}"),
        }
    }
    assert_eq!(feedback(&a, &id).await, 409, "the same user's second feedback, on the other replica");
    assert_eq!(read_group(&mut conn).await, vec![id.clone()]);
    assert!(read_group(&mut conn).await.is_empty(), "each record is read once");

    // Redis goes away: feedback is still acknowledged (spooled), and replayed when it returns.
    let local = answer(&b).await;
    redis.stop();
    assert_eq!(feedback(&b, &local).await, 201);
    let spool = root.path().join("b").join(protocol::names::FEEDBACK_DIR).join(protocol::names::SPOOL_FILE);
    assert!(std::fs::read_to_string(&spool).unwrap().contains(&local));
    let _redis = PrivateRedis::start(port);
    let mut conn = group(port).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while !seen.contains(&local) {
        seen.extend(read_group(&mut conn).await);
        assert!(Instant::now() < deadline, "the spooled record never reached the stream");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, vec![local], "replayed once, nothing else");
    assert_eq!(std::fs::read_to_string(&spool).unwrap_or_default(), "");
}
