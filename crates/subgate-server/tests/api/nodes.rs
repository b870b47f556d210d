//! The real `subgate` binary as separate processes: for restarts, kills and several nodes on
//! one database.

use crate::common::{CONFIG, SECRET};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Node {
    pub base: String,
    child: Child,
    log: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Node {
    /// Starts `subgate serve` with the test config on `database_url` and waits until ready.
    pub async fn spawn(dir: &Path, database_url: &str) -> Node {
        Self::spawn_with(dir, database_url, CONFIG).await
    }

    pub async fn spawn_with(dir: &Path, database_url: &str, config_text: &str) -> Node {
        let port = free_port();
        let config = dir.join(format!("subgate-{port}.toml"));
        std::fs::write(&config, config_text).unwrap();
        let log = dir.join(format!("node-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_subgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", database_url])
            .env("SUBGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut node = Node {
            base: format!("http://127.0.0.1:{port}"),
            child,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{}/ready", node.base))
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            if let Ok(Some(status)) = node.child.try_wait() {
                panic!("the server exited ({status}): {}", node.log_text());
            }
            assert!(Instant::now() < deadline, "the server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        node
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM: a graceful stop.
    pub fn terminate(&mut self) {
        Command::new("kill")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request with the test app's secret key as `cuid`; `Err` when the node did not answer.
pub async fn call(
    client: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    cuid: &str,
    body: Option<Value>,
) -> Result<(u16, Value), reqwest::Error> {
    let mut req = client
        .request(method, format!("{base}{path}"))
        .header("Authorization", format!("Api-Key {SECRET}"))
        .header("adapty-customer-user-id", cuid);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}
