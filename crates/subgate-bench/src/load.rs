//! The load generator: `concurrency` keep-alive HTTP/1.1 connections, each sending its next
//! request as soon as the previous answer is read (closed loop), or on a fixed schedule (open
//! loop, for latency at a given rate, measured from the scheduled time so a slow answer is not
//! hidden by the requests it delayed).

use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Baseline,
    GetProfile,
    SetTransaction,
    Grant,
    Mixed,
}

impl Scenario {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "baseline" => Scenario::Baseline,
            "get_profile" => Scenario::GetProfile,
            "set_transaction" => Scenario::SetTransaction,
            "grant" => Scenario::Grant,
            "mixed" => Scenario::Mixed,
            _ => return None,
        })
    }

    /// Whether the scenario adds rows to the profiles it touches.
    pub fn writes(self) -> bool {
        matches!(
            self,
            Scenario::SetTransaction | Scenario::Grant | Scenario::Mixed
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::GetProfile => "get_profile",
            Scenario::SetTransaction => "set_transaction",
            Scenario::Grant => "grant",
            Scenario::Mixed => "mixed",
        }
    }
}

#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub secret_key: String,
    pub profiles: u64,
}

pub struct Outcome {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub latency_us: Histogram<u64>,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    /// The two measurements as one: their requests, seconds and latencies added up.
    pub fn merge(mut self, other: Outcome) -> anyhow::Result<Outcome> {
        self.requests += other.requests;
        self.errors += other.errors;
        self.seconds += other.seconds;
        self.latency_us.add(&other.latency_us)?;
        Ok(self)
    }

    pub fn percentile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

fn profile_header(target: &Target) -> String {
    crate::seed::customer_user_id(rand::random::<u64>() % target.profiles.max(1))
}

fn request(
    target: &Target,
    scenario: Scenario,
    task: usize,
    n: u64,
    nonce: u32,
) -> Request<Full<Bytes>> {
    let write = match scenario {
        Scenario::Mixed => rand::random::<u8>().is_multiple_of(10),
        Scenario::SetTransaction | Scenario::Grant => true,
        Scenario::Baseline | Scenario::GetProfile => false,
    };
    let builder = Request::builder()
        .header("host", target.addr.to_string())
        .header("authorization", format!("Api-Key {}", target.secret_key));
    let now = subgate_core::time::format_v2(&chrono::Utc::now());
    let (method, path, body) = match (scenario, write) {
        (Scenario::Baseline, _) => ("GET", "/health", String::new()),
        (Scenario::GetProfile | Scenario::Mixed, false) => {
            ("GET", "/api/v2/server-side-api/profile/", String::new())
        }
        (Scenario::Grant, _) => (
            "POST",
            "/api/v2/server-side-api/purchase/profile/grant/access-level/",
            serde_json::json!({
                "access_level_id": "premium",
                "expires_at": subgate_core::time::format_v2(&(chrono::Utc::now() + chrono::Duration::days(30))),
            })
            .to_string(),
        ),
        (Scenario::SetTransaction | Scenario::Mixed, _) => {
            let id = format!("bench-{nonce}-{task}-{n}");
            (
                "POST",
                "/api/v2/server-side-api/purchase/set/transaction/",
                serde_json::json!({
                    "purchase_type": "one_time_purchase",
                    "store": "app_store",
                    "store_product_id": "com.bench.coins",
                    "store_transaction_id": id,
                    "store_original_transaction_id": id,
                    "price": {"country": "US", "currency": "USD", "value": 0.99},
                    "purchased_at": now,
                })
                .to_string(),
            )
        }
        (Scenario::GetProfile, true) => unreachable!("reads never write"),
    };
    let mut builder = builder.method(method).uri(path);
    if scenario != Scenario::Baseline {
        builder = builder.header("adapty-customer-user-id", profile_header(target));
    }
    if !body.is_empty() {
        builder = builder.header("content-type", "application/json");
    }
    builder
        .body(Full::new(Bytes::from(body)))
        .expect("a well-formed request")
}

struct TaskResult {
    requests: u64,
    errors: u64,
    latency_us: Histogram<u64>,
}

async fn connection(
    target: Target,
    scenario: Scenario,
    task: usize,
    nonce: u32,
    measure_from: Instant,
    until: Instant,
    period: Option<Duration>,
) -> anyhow::Result<TaskResult> {
    let stream = TcpStream::connect(target.addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut requests, mut errors) = (0, 0);
    let mut n = 0u64;
    // Spread the scheduled tasks over one period so they do not fire in step.
    let mut scheduled = period.map(|p| Instant::now() + p.mul_f64((task % 97) as f64 / 97.0));
    loop {
        if let (Some(at), Some(period)) = (scheduled.as_mut(), period) {
            tokio::time::sleep_until((*at).into()).await;
            *at += period;
        }
        let started = match (scheduled, period) {
            (Some(next), Some(period)) => next - period,
            _ => Instant::now(),
        };
        if started >= until {
            break;
        }
        let response = sender
            .send_request(request(&target, scenario, task, n, nonce))
            .await?;
        let ok = response.status().is_success();
        response.into_body().collect().await?;
        n += 1;
        if started >= measure_from {
            requests += 1;
            if !ok {
                errors += 1;
            }
            let us = started.elapsed().as_micros().max(1) as u64;
            latency_us.saturating_record(us);
        }
    }
    Ok(TaskResult {
        requests,
        errors,
        latency_us,
    })
}

/// Runs one scenario: `warmup` unmeasured, then `duration` measured. With `rate`, the whole
/// load is paced to that many requests per second.
pub async fn run(
    target: &Target,
    scenario: Scenario,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<Outcome> {
    let nonce = rand::random::<u32>();
    let measure_from = Instant::now() + warmup;
    let until = measure_from + duration;
    let period = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r.max(1.0)));
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            tokio::spawn(connection(
                target.clone(),
                scenario,
                task,
                nonce,
                measure_from,
                until,
                period,
            ))
        })
        .collect();
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut requests, mut errors) = (0, 0);
    for task in tasks {
        let result = task.await??;
        requests += result.requests;
        errors += result.errors;
        latency_us.add(&result.latency_us)?;
    }
    Ok(Outcome {
        requests,
        errors,
        seconds: duration.as_secs_f64(),
        latency_us,
    })
}
