//! A real HTTP webhook receiver on a free port: records what arrives and answers as scripted.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub raw: Vec<u8>,
    pub body: Value,
}

impl Received {
    pub fn event_type(&self) -> &str {
        self.body["event_type"].as_str().unwrap_or_default()
    }

    pub fn event_id(&self) -> &str {
        self.body["event_properties"]["profile_event_id"]
            .as_str()
            .unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How the receiver answers the next request.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    Status(u16),
    /// Answer only after this long (longer than the sender's timeout).
    Hang(Duration),
}

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<Answer>>,
}

pub struct Receiver {
    pub url: String,
    shared: Arc<Shared>,
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let answer = shared.script.lock().unwrap().pop_front();
    shared.received.lock().unwrap().push(Received {
        path: uri.path().to_string(),
        headers,
        raw: body.to_vec(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    if let Some(Answer::Hang(time)) = answer {
        tokio::time::sleep(time).await;
    }
    let status = match answer {
        Some(Answer::Status(code)) => StatusCode::from_u16(code).unwrap(),
        _ => StatusCode::OK,
    };
    (status, "{}")
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::start_on(0).await
    }

    pub async fn start_on(port: u16) -> Receiver {
        let shared = Arc::new(Shared::default());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/{*path}", post(receive))
            .with_state(Arc::clone(&shared));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, shared }
    }

    /// The next requests get these answers, in order; then 200.
    pub fn script(&self, answers: &[Answer]) {
        self.shared.script.lock().unwrap().extend(answers);
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests have arrived, and returns them all.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} webhook calls, got {}: {:?}",
                received.len(),
                received
                    .iter()
                    .map(|r| r.event_type().to_string())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for `n` requests, then a little longer to catch any that should not come.
    pub async fn exactly(&self, n: usize) -> Vec<Received> {
        self.wait_for(n).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let received = self.received();
        assert_eq!(
            received.len(),
            n,
            "{:?}",
            received
                .iter()
                .map(|r| r.event_type().to_string())
                .collect::<Vec<_>>()
        );
        received
    }
}
