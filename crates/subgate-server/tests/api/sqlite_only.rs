//! What only the embedded file has: one process owns it.

use crate::common::*;
use crate::nodes::{call, Node};
use futures_util::future::join_all;
use reqwest::Method;
use serde_json::json;
use std::process::Command;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_process_on_the_same_file_is_refused_clearly() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(db.dir.path(), &db.url).await;
    let client = reqwest::Client::new();
    let (status, _) = call(&client, &node.base, Method::POST, PROFILE, "owner", None)
        .await
        .unwrap();
    assert_eq!(status, 200);

    // Without a config it writes a demo one into its working directory: the test's own.
    let second = Command::new(env!("CARGO_BIN_EXE_subgate"))
        .current_dir(db.dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &db.url,
        ])
        .env("SUBGATE_LOG", "warn")
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("in use by another Subgate process"),
        "{stderr}"
    );

    // The owner carries on.
    let (status, body) = call(&client, &node.base, Method::GET, PROFILE, "owner", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_runs_the_request_threads_its_config_asks_for() {
    use std::io::BufRead;
    let db = TestDb::new(Backend::Sqlite).await;
    let serve = |threads: usize| {
        let config = db.dir.path().join(format!("threads-{threads}.toml"));
        let text = CONFIG.replacen(
            "[server]\n",
            &format!("[server]\nworker_threads = {threads}\n"),
            1,
        );
        std::fs::write(&config, text).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_subgate"));
        command
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--database-url", &db.url])
            .env("SUBGATE_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command
    };

    // The runtime reports its own count in the start line.
    let mut node = serve(3).spawn().unwrap();
    let stderr = std::io::BufReader::new(node.stderr.take().unwrap());
    let started = tokio::task::spawn_blocking(move || {
        stderr
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains("serving"))
    });
    let started = tokio::time::timeout(std::time::Duration::from_secs(30), started).await;
    node.kill().unwrap();
    node.wait().unwrap();
    let line = started.unwrap().unwrap().expect("no start line");
    assert!(line.contains("workers=3"), "{line}");

    let refused = serve(0).output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("worker_threads must be at least 1"),
        "{stderr}"
    );
}

/// The WAL's size once `WRITERS` clients, each updating its own profile `WRITES` times in a
/// row, were answered, with the log rewound past `wal_rewind_pages`.
async fn wal_bytes_after_steady_writes(wal_rewind_pages: u32) -> u64 {
    const WRITERS: usize = 16;
    const WRITES: u64 = 300;
    let config = format!(
        "[database]\nwal_rewind_pages = {wal_rewind_pages}\ncheckpoint_interval_ms = 100\n{CONFIG}"
    );
    let s = Arc::new(TestServer::start_with(TestDb::new(Backend::Sqlite).await, &config).await);
    let writers = (0..WRITERS).map(|w| {
        let s = Arc::clone(&s);
        async move {
            let user = format!("writer-{w}");
            s.create(&user).await;
            for n in 1..=WRITES {
                let body = json!({"custom_attributes": {"n": n}});
                let (status, body) = s.profile(Method::PATCH, &user, Some(body)).await;
                assert_eq!(status, 200, "{body}");
            }
            // Rewinds lose nothing.
            let (status, body) = s.profile(Method::GET, &user, None).await;
            assert_eq!(status, 200, "{body}");
            let n = body["data"]["custom_attributes"]
                .as_array()
                .and_then(|a| a.iter().find(|a| a["key"] == "n"))
                .map(|a| a["value"].clone());
            assert_eq!(n, Some(json!(WRITES as f64)), "{body}");
        }
    });
    join_all(writers).await;
    std::fs::metadata(s.db.dir.path().join("test.db-wal"))
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_steady_writes_the_wal_starts_over() {
    // Without rewinds the log keeps growing while the writer is never idle; with them it holds
    // only the pages since the last one (a checkpoint looks every 100 ms).
    let rewound = wal_bytes_after_steady_writes(16).await;
    let grown = wal_bytes_after_steady_writes(u32::MAX).await;
    // Measured: 1.0-1.2 MB against 5-10 MB (SQLite rewinds by itself when the writer idles
    // at the right moment, so the second varies); without the rewinds, both alike.
    assert!(
        rewound * 2 < grown,
        "WAL of {rewound} bytes with rewinds, {grown} without"
    );
}
