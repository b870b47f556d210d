//! The webhook worker. Every node runs one: it fires the expiry events of subscription periods
//! that have ended, then leases due events from the outbox (the store guarantees no two nodes
//! lease the same event, and a profile's events go one at a time, in order) and posts them.
//! An answer from 200 to 404 is done; anything else, a refused connection or no answer within
//! the timeout is retried on the schedule, then marked failed. Nothing is dropped silently.

use crate::config::{signing_key, Settings, WebhookSettings};
use base64::Engine as _;
use chrono::{DateTime, Duration as TimeDelta, Utc};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use subgate_core::model::{App, Environment};
use subgate_core::service::Services;
use subgate_core::store::{DeliveryResult, DeliveryState, StoredEvent};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Events leased per round; a round sends them concurrently (they are of distinct profiles).
const BATCH: u32 = 256;
/// Expired periods dealt with per round.
const EXPIRY_BATCH: u32 = 100;
/// Old events deleted per statement: short enough not to hold SQLite's writer long.
const SWEEP_BATCH: u32 = 1_000;
/// Between two retention sweeps that found nothing more to delete, in the clock's time.
const SWEEP_EVERY: TimeDelta = TimeDelta::hours(1);

/// An app's webhook endpoint, ready to use.
#[derive(Clone)]
pub struct Endpoint {
    pub url: String,
    pub sandbox_url: Option<String>,
    pub authorization: Option<String>,
    pub signing_key: Option<Vec<u8>>,
    pub event_names: BTreeMap<String, String>,
}

impl Endpoint {
    pub fn from_settings(settings: &WebhookSettings) -> anyhow::Result<Self> {
        Ok(Self {
            url: settings.url.clone(),
            sandbox_url: settings.sandbox_url.clone(),
            authorization: settings.authorization.clone(),
            signing_key: settings
                .signing_secret
                .as_deref()
                .map(signing_key)
                .transpose()?,
            event_names: settings.event_names.clone(),
        })
    }

    /// Sandbox events go to the sandbox URL when there is one.
    pub fn url_for(&self, environment: Environment) -> &str {
        match environment {
            Environment::Sandbox => self.sandbox_url.as_deref().unwrap_or(&self.url),
            Environment::Production => &self.url,
        }
    }

    /// Posts `body` as message `id`, with the Authorization and signature headers.
    pub async fn post(
        &self,
        client: &reqwest::Client,
        url: &str,
        id: &str,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut request = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(authorization) = &self.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization);
        }
        if let Some(key) = &self.signing_key {
            let timestamp = now.timestamp().to_string();
            request = request
                .header("webhook-id", id)
                .header("webhook-timestamp", &timestamp)
                .header("webhook-signature", sign(key, id, &timestamp, body));
        }
        request.send().await
    }
}

/// A Standard Webhooks signature: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`.
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{signature}")
}

pub struct Worker {
    services: Services,
    apps: HashMap<Uuid, (Arc<App>, Option<Endpoint>)>,
    client: reqwest::Client,
    retry_delays: Vec<TimeDelta>,
    timeout: Duration,
    poll: Duration,
    /// `events.retention_days`, if set.
    retention: Option<TimeDelta>,
    /// When the next retention sweep is due (none yet: at once).
    next_sweep: std::sync::Mutex<Option<DateTime<Utc>>>,
}

impl Worker {
    pub fn new(settings: &Settings, services: Services, apps: &[Arc<App>]) -> anyhow::Result<Self> {
        let mut by_id = HashMap::new();
        for (app, config) in apps.iter().zip(&settings.apps) {
            let endpoint = config
                .webhook
                .as_ref()
                .map(Endpoint::from_settings)
                .transpose()?;
            by_id.insert(app.id(), (Arc::clone(app), endpoint));
        }
        let timeout = Duration::from_secs(settings.webhooks.timeout_seconds);
        Ok(Self {
            services,
            apps: by_id,
            client: reqwest::Client::builder()
                .timeout(timeout)
                .user_agent(concat!("Subgate/", env!("CARGO_PKG_VERSION")))
                .build()?,
            retry_delays: settings
                .webhooks
                .retry_delays_seconds
                .iter()
                .map(|s| TimeDelta::seconds(i64::try_from(*s).unwrap_or(i64::MAX / 1000)))
                .collect(),
            timeout,
            poll: Duration::from_millis(settings.webhooks.poll_interval_ms.max(1)),
            retention: settings
                .events
                .retention_days
                .map(|days| TimeDelta::days(i64::from(days))),
            next_sweep: std::sync::Mutex::new(None),
        })
    }

    /// Runs until `stop` turns true.
    pub fn spawn(self, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let busy = self.round().await;
                if *stop.borrow() {
                    break;
                }
                if !busy {
                    tokio::select! {
                        _ = tokio::time::sleep(self.poll) => {}
                        _ = stop.changed() => break,
                    }
                }
            }
        })
    }

    /// One pass over ended periods and due events; whether it found work.
    async fn round(&self) -> bool {
        let now = self.services.now();
        let mut busy = false;
        match self.services.store.due_expirations(now, EXPIRY_BATCH).await {
            Ok(due) => {
                for due in due {
                    let Some((app, _)) = self.apps.get(&due.app_id) else {
                        continue;
                    };
                    busy = true;
                    if let Err(e) = self.services.handle_expiry(app, due).await {
                        tracing::warn!(error = %e, "expiry not handled; will retry");
                        busy = false;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "expiry scan failed"),
        }
        let lease_until = now
            + TimeDelta::from_std(self.timeout).unwrap_or(TimeDelta::seconds(10))
            + TimeDelta::seconds(30);
        match self
            .services
            .store
            .claim_events(now, lease_until, BATCH)
            .await
        {
            Ok(events) if !events.is_empty() => {
                let results =
                    futures_util::future::join_all(events.iter().map(|e| self.deliver(e))).await;
                let ids = events.iter().map(|e| e.id);
                if let Err(e) = self
                    .services
                    .store
                    .finish_deliveries(ids.zip(results).collect())
                    .await
                {
                    // The leases run out and the events are sent again: at least once.
                    tracing::warn!(error = %e, "delivery outcomes not recorded");
                }
                busy = true;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "event claim failed"),
        }
        if let Some(retention) = self.retention {
            busy |= self.sweep(now, retention).await;
        }
        busy
    }

    /// Deletes a batch of settled events older than `retention`, once per [`SWEEP_EVERY`],
    /// or again at once while batches come back full; whether more may be waiting.
    async fn sweep(&self, now: DateTime<Utc>, retention: TimeDelta) -> bool {
        let next_sweep = || {
            self.next_sweep
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if next_sweep().is_some_and(|due| now < due) {
            return false;
        }
        // A retention of millions of years reaches past the calendar: nothing is that old.
        let Some(cutoff) = now.checked_sub_signed(retention) else {
            return false;
        };
        let (more, next) = match self
            .services
            .store
            .delete_settled_events(cutoff, SWEEP_BATCH)
            .await
        {
            Ok(deleted) => {
                if deleted > 0 {
                    tracing::info!(deleted, "deleted settled events past their retention");
                }
                let more = deleted == u64::from(SWEEP_BATCH);
                (more, if more { None } else { Some(now + SWEEP_EVERY) })
            }
            Err(e) => {
                tracing::warn!(error = %e, "deleting old events failed; will retry");
                (false, Some(now + TimeDelta::minutes(1)))
            }
        };
        *next_sweep() = next;
        more
    }

    async fn deliver(&self, event: &StoredEvent) -> DeliveryResult {
        let endpoint = self.apps.get(&event.app_id).and_then(|(_, e)| e.as_ref());
        match endpoint {
            None => DeliveryResult {
                state: DeliveryState::NoEndpoint,
                status: None,
                error: None,
                next_attempt_at: None,
                at: self.services.now(),
                attempted: false,
            },
            Some(endpoint) => self.attempt(endpoint, event).await,
        }
    }

    async fn attempt(&self, endpoint: &Endpoint, event: &StoredEvent) -> DeliveryResult {
        let body = render(endpoint, event);
        let url = endpoint.url_for(event.environment);
        let now = self.services.now();
        let outcome = endpoint
            .post(&self.client, url, &event.id.to_string(), &body, now)
            .await;
        let at = self.services.now();
        let (status, error) = match outcome {
            Ok(response) => (Some(i32::from(response.status().as_u16())), None),
            Err(e) if e.is_timeout() => {
                (None, Some(format!("no answer within {:?}", self.timeout)))
            }
            Err(e) => (None, Some(describe(&e))),
        };
        let done = status.is_some_and(|s| (200..=404).contains(&s));
        let retry = self
            .retry_delays
            .get(usize::try_from(event.attempts).unwrap_or(usize::MAX));
        let (state, next_attempt_at) = match (done, retry) {
            (true, _) => (DeliveryState::Delivered, None),
            (false, Some(delay)) => (DeliveryState::Pending, Some(at + *delay)),
            (false, None) => (DeliveryState::Failed, None),
        };
        if !done {
            tracing::info!(event = %event.id, ?status, ?error, state = state.as_str(), "webhook not accepted");
        }
        DeliveryResult {
            state,
            status,
            error,
            next_attempt_at,
            at,
            attempted: true,
        }
    }
}

fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// The body sent: the stored payload with the event type renamed as the app asks.
pub fn render(endpoint: &Endpoint, event: &StoredEvent) -> Vec<u8> {
    let mut payload = event.payload.clone();
    if let Some(name) = endpoint.event_names.get(&event.event_type) {
        payload["event_type"] = Value::String(name.clone());
    }
    serde_json::to_vec(&payload).unwrap_or_default()
}
