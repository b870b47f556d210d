//! What only the embedded file has: one process owns it.

use crate::common::*;
use crate::nodes::{call, Node};
use reqwest::Method;
use std::process::Command;

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
