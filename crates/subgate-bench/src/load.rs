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

/// When each request of a connection is due: at once after the previous answer, or when the
/// pacer releases it.
enum Schedule {
    Closed,
    Paced(tokio::sync::mpsc::UnboundedReceiver<Instant>),
}

async fn connection(
    target: Target,
    scenario: Scenario,
    task: usize,
    nonce: u32,
    measure_from: Instant,
    until: Instant,
    mut schedule: Schedule,
) -> anyhow::Result<TaskResult> {
    let stream = TcpStream::connect(target.addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut requests, mut errors) = (0, 0);
    let mut n = 0u64;
    loop {
        // A paced request's latency runs from when it was due, so time it spent queued behind
        // a slow answer on this connection counts (no coordinated omission).
        let started = match &mut schedule {
            Schedule::Closed => Instant::now(),
            Schedule::Paced(due) => match due.recv().await {
                Some(at) => at,
                None => break,
            },
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

/// How often, at most, the pacer wakes. tokio's timer rounds each sleep up to a whole
/// millisecond tick: measured on session 11's machine at 18k requests/s, that made requests
/// start 1.0 ms late at the median and 2.9 ms at the 99th percentile, before the server saw
/// them, and the paced latencies counted it. A thread's own sleep lands within tens of
/// microseconds; waking it for every request (18k times a second) would take CPU from the
/// server, so each wake releases the requests that fell due since the last.
const PACER_TICK: Duration = Duration::from_micros(200);

/// Releases request `k` at `first + k * period / n` to connection `k % n` (of `n`) until
/// `until`: each connection is due once a period, the connections' turns spread evenly over it,
/// as a steady stream of users would arrive. A request is released at most a tick late.
fn pace(
    connections: Vec<tokio::sync::mpsc::UnboundedSender<Instant>>,
    first: Instant,
    period: Duration,
    until: Instant,
) {
    let Some(step) = u32::try_from(connections.len())
        .ok()
        .filter(|&n| n > 0)
        .map(|n| period / n)
    else {
        return;
    };
    for k in 0u32.. {
        let due = first + step * k;
        if due >= until {
            return;
        }
        let early = due.saturating_duration_since(Instant::now());
        if !early.is_zero() {
            std::thread::sleep(early.max(PACER_TICK));
        }
        // A connection whose task ended has failed, and its error ends the run.
        if connections[k as usize % connections.len()]
            .send(due)
            .is_err()
        {
            return;
        }
    }
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
    let (schedules, pacer): (Vec<Schedule>, Option<std::thread::JoinHandle<()>>) = match rate {
        None => ((0..concurrency).map(|_| Schedule::Closed).collect(), None),
        Some(rate) => {
            let (senders, receivers): (Vec<_>, Vec<_>) = (0..concurrency)
                .map(|_| tokio::sync::mpsc::unbounded_channel())
                .unzip();
            let period = Duration::from_secs_f64(concurrency as f64 / rate.max(1.0));
            // The first requests wait for the connections to open, as unpaced ones do.
            let first = Instant::now() + Duration::from_millis(20);
            let pacer = std::thread::Builder::new()
                .name("pacer".into())
                .spawn(move || pace(senders, first, period, until))?;
            (
                receivers.into_iter().map(Schedule::Paced).collect(),
                Some(pacer),
            )
        }
    };
    let tasks: Vec<_> = schedules
        .into_iter()
        .enumerate()
        .map(|(task, schedule)| {
            tokio::spawn(connection(
                target.clone(),
                scenario,
                task,
                nonce,
                measure_from,
                until,
                schedule,
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
    if let Some(pacer) = pacer {
        pacer
            .join()
            .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
    }
    Ok(Outcome {
        requests,
        errors,
        seconds: duration.as_secs_f64(),
        latency_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_gives_each_connection_its_turns_in_order() {
        let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..3)
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        let first = Instant::now() + Duration::from_millis(2);
        let period = Duration::from_millis(3);
        // Twelve turns of 1 ms each, the last due just before `until`.
        let until = first + Duration::from_micros(11_500);
        std::thread::spawn(move || pace(senders, first, period, until))
            .join()
            .expect("the pacer ran");
        for (n, receiver) in receivers.iter_mut().enumerate() {
            let mut turns = Vec::new();
            while let Ok(due) = receiver.try_recv() {
                turns.push(due);
            }
            let expected: Vec<Instant> = (0..4)
                .map(|round| first + Duration::from_millis(n as u64 + 3 * round))
                .collect();
            assert_eq!(turns, expected, "connection {n}");
        }
    }
}
