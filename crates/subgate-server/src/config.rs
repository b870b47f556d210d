//! Settings: defaults, then the TOML file, then `SUBGATE_*` variables, then flags. Apps are
//! declared here (config as code) and upserted into the database at start.

use anyhow::{bail, Context};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use subgate_core::events::EventType;
use subgate_core::model::{
    AppDefinition, Product, ProductKind, BUILTIN_STORES, DEFAULT_ACCESS_LEVEL,
};
use uuid::Uuid;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEMO_DIR: &str = "subgate-data";
pub const DEMO_CONFIG: &str = "subgate-data/subgate.toml";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://subgate-data/subgate.db";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub database: DatabaseSettings,
    /// Units of a currency per US dollar, added to or overriding the shipped table.
    #[serde(default)]
    pub currency_rates: HashMap<String, f64>,
    #[serde(default)]
    pub apps: Vec<AppSettings>,
    #[serde(default)]
    pub webhooks: WebhooksSettings,
    #[serde(default)]
    pub events: EventsSettings,
}

/// The event outbox and feed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventsSettings {
    /// Settled events (delivered, failed, or of an app without a webhook) older than this
    /// many days are deleted; pending ones never are. Unset: every event is kept.
    #[serde(default)]
    pub retention_days: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerSettings {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Threads answering requests; see [`ServerSettings::worker_threads`].
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

impl ServerSettings {
    /// The configured number of request threads, or the machine's cores plus four. A SQLite
    /// read runs on the thread that answers the request, and where the kernel has dropped its
    /// page from memory that thread waits for the disk; threads beyond the cores keep the CPU
    /// answering others meanwhile. With a million profiles on a file read from the disk, 2
    /// threads on the 2-core benchmark machine answered 17-20k reads/s, 6 threads 41-43k/s
    /// (docs/bench/FINDINGS.md, SQLite reads); at 10k profiles, all in memory, both gave the
    /// same.
    pub fn worker_threads(&self) -> usize {
        self.worker_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()) + 4)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatabaseSettings {
    #[serde(default = "default_database_url")]
    pub url: String,
    /// Connections this node keeps to PostgreSQL at most (SQLite has one writer and a few
    /// readers whatever this says).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Profiles a SQLite node keeps decoded in memory for reads (0: none). PostgreSQL nodes
    /// keep none: another node may change a profile at any time.
    #[serde(default = "default_cached_profiles")]
    pub cached_profiles: usize,
    /// SQLite only: and their estimated size at most, in MiB.
    #[serde(default = "default_cached_profiles_mib")]
    pub cached_profiles_mib: usize,
    /// SQLite only: WAL pages (4 KiB each) past which the log starts over; see
    /// `SqliteOptions::wal_rewind_pages`.
    #[serde(default = "default_wal_rewind_pages")]
    pub wal_rewind_pages: u32,
    /// SQLite only: how often, in milliseconds, the WAL is copied into the database file; see
    /// `SqliteOptions::checkpoint_interval`.
    #[serde(default = "default_checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
}

fn default_checkpoint_interval_ms() -> u64 {
    let interval = subgate_sqlite::SqliteOptions::default().checkpoint_interval;
    u64::try_from(interval.as_millis()).unwrap_or(u64::MAX)
}

fn default_wal_rewind_pages() -> u32 {
    subgate_sqlite::SqliteOptions::default().wal_rewind_pages
}

fn default_max_connections() -> usize {
    16
}

fn default_cached_profiles() -> usize {
    subgate_sqlite::SqliteOptions::default().cached_profiles
}

fn default_cached_profiles_mib() -> usize {
    subgate_sqlite::SqliteOptions::default().cached_profiles_mib
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}

fn default_database_url() -> String {
    DEFAULT_DATABASE_URL.to_string()
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            worker_threads: None,
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: default_database_url(),
            max_connections: default_max_connections(),
            cached_profiles: default_cached_profiles(),
            cached_profiles_mib: default_cached_profiles_mib(),
            wal_rewind_pages: default_wal_rewind_pages(),
            checkpoint_interval_ms: default_checkpoint_interval_ms(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppSettings {
    /// Optional; without it the id is derived from the name, so it is stable across restarts.
    pub id: Option<Uuid>,
    pub name: String,
    #[serde(default)]
    pub public_keys: Vec<String>,
    #[serde(default)]
    pub secret_keys: Vec<String>,
    #[serde(default)]
    pub custom_stores: Vec<String>,
    #[serde(default)]
    pub access_levels: Vec<AccessLevelSettings>,
    #[serde(default)]
    pub products: Vec<ProductSettings>,
    /// Where this app's events are sent; without it they are only kept for the event feed.
    #[serde(default)]
    pub webhook: Option<WebhookSettings>,
    /// The app's Stripe account, for validating Stripe purchases.
    #[serde(default)]
    pub stripe: Option<StripeSettings>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StripeSettings {
    pub secret_key: String,
    /// Overridable, e.g. for a local Stripe stand-in.
    #[serde(default = "default_stripe_api_base")]
    pub api_base: String,
}

fn default_stripe_api_base() -> String {
    "https://api.stripe.com".to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebhookSettings {
    /// Production events (and Sandbox ones when there is no `sandbox_url`).
    pub url: String,
    pub sandbox_url: Option<String>,
    /// Sent verbatim as the `Authorization` header.
    pub authorization: Option<String>,
    /// `whsec_<base64 key>`: adds Standard Webhooks signature headers.
    pub signing_secret: Option<String>,
    /// Renames, as Adapty allows: event type to the name sent in `event_type`.
    #[serde(default)]
    pub event_names: BTreeMap<String, String>,
}

/// Delivery settings shared by every app.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebhooksSettings {
    /// Waits before each retry; the event is marked failed after the last one.
    #[serde(default = "default_retry_delays")]
    pub retry_delays_seconds: Vec<u64>,
    /// An endpoint that has not answered by then is retried.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_seconds: u64,
    /// How often each node looks for events to send and subscription periods that ended.
    #[serde(default = "default_poll_interval")]
    pub poll_interval_ms: u64,
}

/// Adapty's schedule: 9 retries with growing gaps, 24 hours in all.
fn default_retry_delays() -> Vec<u64> {
    vec![60, 300, 900, 1800, 3600, 7200, 14400, 28800, 29340]
}

fn default_webhook_timeout() -> u64 {
    10
}

fn default_poll_interval() -> u64 {
    200
}

impl Default for WebhooksSettings {
    fn default() -> Self {
        Self {
            retry_delays_seconds: default_retry_delays(),
            timeout_seconds: default_webhook_timeout(),
            poll_interval_ms: default_poll_interval(),
        }
    }
}

/// The key bytes of a `whsec_...` signing secret.
pub fn signing_key(secret: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine as _;
    let encoded = secret
        .strip_prefix("whsec_")
        .context("signing_secret must look like whsec_<base64>")?;
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .context("signing_secret: the part after whsec_ is not base64")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessLevelSettings {
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProductSettings {
    pub id: String,
    pub access_level_id: Option<String>,
    #[serde(rename = "type", default = "default_product_kind")]
    pub kind: ProductKind,
    #[serde(default)]
    pub store_product_ids: BTreeMap<String, String>,
}

fn default_product_kind() -> ProductKind {
    ProductKind::Subscription
}

/// Overrides given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub database_url: Option<String>,
}

impl AppSettings {
    pub fn app_id(&self) -> Uuid {
        self.id.unwrap_or_else(|| {
            Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                format!("subgate-app:{}", self.name).as_bytes(),
            )
        })
    }

    pub fn definition(&self) -> AppDefinition {
        AppDefinition {
            id: self.app_id(),
            name: self.name.clone(),
            access_levels: self.access_levels.iter().map(|l| l.id.clone()).collect(),
            products: self
                .products
                .iter()
                .map(|p| Product {
                    id: p.id.clone(),
                    access_level_id: p.access_level_id.clone(),
                    kind: p.kind,
                    store_product_ids: p.store_product_ids.clone(),
                })
                .collect(),
            custom_stores: self.custom_stores.clone(),
        }
    }
}

impl Settings {
    /// Reads `path` (if any) and applies the environment and `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Settings::empty()));
        if let Some(path) = path {
            if !path.exists() {
                bail!("config file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment
            .merge(
                Env::raw()
                    .only(&["SUBGATE_LISTEN"])
                    .map(|_| "server.listen".into()),
            )
            .merge(
                Env::raw()
                    .only(&["SUBGATE_DATABASE_URL"])
                    .map(|_| "database.url".into()),
            )
            .merge(
                Env::raw()
                    .only(&["SUBGATE_WORKER_THREADS"])
                    .map(|_| "server.worker_threads".into()),
            );
        let mut settings: Settings = figment.extract().with_context(|| match path {
            Some(p) => format!("invalid configuration in {}", p.display()),
            None => "invalid configuration".to_string(),
        })?;
        if let Some(listen) = &overrides.listen {
            settings.server.listen = listen.clone();
        }
        if let Some(url) = &overrides.database_url {
            settings.database.url = url.clone();
        }
        settings.validate()?;
        Ok(settings)
    }

    pub fn empty() -> Self {
        Self {
            server: ServerSettings::default(),
            database: DatabaseSettings::default(),
            currency_rates: HashMap::new(),
            apps: Vec::new(),
            webhooks: WebhooksSettings::default(),
            events: EventsSettings::default(),
        }
    }

    /// Refuses configurations that would misbehave later: shared keys, unknown levels or stores.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.server.worker_threads == Some(0) {
            bail!("server.worker_threads must be at least 1");
        }
        if self.database.checkpoint_interval_ms == 0 {
            bail!("database.checkpoint_interval_ms must be at least 1");
        }
        if self.events.retention_days == Some(0) {
            bail!("events.retention_days must be at least 1 (leave it out to keep every event)");
        }
        let mut keys = HashSet::new();
        let mut ids = HashSet::new();
        for app in &self.apps {
            if !ids.insert(app.app_id()) {
                bail!("app `{}`: two apps have the same id", app.name);
            }
            if app.public_keys.is_empty() && app.secret_keys.is_empty() {
                bail!("app `{}` has no API keys", app.name);
            }
            for key in app.public_keys.iter().chain(&app.secret_keys) {
                if key.trim().is_empty() || key.contains(char::is_whitespace) {
                    bail!(
                        "app `{}`: API keys must be non-empty and contain no spaces",
                        app.name
                    );
                }
                if !keys.insert(key.as_str()) {
                    bail!("app `{}`: an API key is used twice", app.name);
                }
            }
            let levels: HashSet<&str> = app
                .access_levels
                .iter()
                .map(|l| l.id.as_str())
                .chain([DEFAULT_ACCESS_LEVEL])
                .collect();
            for product in &app.products {
                if let Some(level) = &product.access_level_id {
                    if !levels.contains(level.as_str()) {
                        bail!(
                            "app `{}`, product `{}`: access level `{level}` is not declared under [[apps.access_levels]]",
                            app.name,
                            product.id
                        );
                    }
                }
                for store in product.store_product_ids.keys() {
                    if !BUILTIN_STORES.contains(&store.as_str())
                        && !app.custom_stores.contains(store)
                    {
                        bail!(
                            "app `{}`, product `{}`: store `{store}` is neither built in ({}) nor in custom_stores",
                            app.name,
                            product.id,
                            BUILTIN_STORES.join(", ")
                        );
                    }
                }
            }
        }
        for app in &self.apps {
            if let Some(stripe) = &app.stripe {
                if stripe.secret_key.trim().is_empty() {
                    bail!("app `{}`, [apps.stripe]: secret_key is empty", app.name);
                }
                reqwest::Url::parse(&stripe.api_base).with_context(|| {
                    format!("app `{}`, [apps.stripe]: api_base is not a URL", app.name)
                })?;
            }
            if let Some(webhook) = &app.webhook {
                webhook
                    .validate()
                    .with_context(|| format!("app `{}`, [apps.webhook]", app.name))?;
            }
        }
        if self.webhooks.timeout_seconds == 0 {
            bail!("webhooks.timeout_seconds must be at least 1");
        }
        for (code, rate) in &self.currency_rates {
            if !(rate.is_finite() && *rate > 0.0) {
                bail!("currency_rates.{code} must be a positive number");
            }
        }
        Ok(())
    }
}

impl WebhookSettings {
    fn validate(&self) -> anyhow::Result<()> {
        for url in std::iter::once(&self.url).chain(&self.sandbox_url) {
            let parsed =
                reqwest::Url::parse(url).with_context(|| format!("`{url}` is not a URL"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                bail!("`{url}` must be an http or https URL");
            }
        }
        if let Some(secret) = &self.signing_secret {
            signing_key(secret)?;
        }
        for name in self.event_names.keys() {
            if EventType::parse(name).is_none() {
                bail!("event_names: `{name}` is not an event type");
            }
        }
        Ok(())
    }
}

/// The config used when none is given: `subgate-data/subgate.toml`, written on first start
/// with a demo app and fresh keys. Returns its path and whether it was just created.
pub fn demo_config() -> anyhow::Result<(PathBuf, bool)> {
    let path = PathBuf::from(DEMO_CONFIG);
    if path.exists() {
        return Ok((path, false));
    }
    std::fs::create_dir_all(DEMO_DIR).with_context(|| format!("cannot create {DEMO_DIR}/"))?;
    let text = format!(
        r#"# Written by `subgate serve` on first start; edit freely. See README.md for every key.
[server]
listen = "{DEFAULT_LISTEN}"

[database]
url = "{DEFAULT_DATABASE_URL}"

[[apps]]
id = "{id}"
name = "Demo"
public_keys = ["public_live_{public}"]
secret_keys = ["secret_live_{secret}"]
custom_stores = ["web"]

[[apps.access_levels]]
id = "premium"

[[apps.products]]
id = "monthly"
access_level_id = "premium"
type = "subscription"
store_product_ids = {{ app_store = "com.demo.monthly", play_store = "monthly", stripe = "prod_demo_monthly", web = "web_monthly" }}

[[apps.products]]
id = "lifetime"
access_level_id = "premium"
type = "one_time"
store_product_ids = {{ app_store = "com.demo.lifetime", web = "web_lifetime" }}
"#,
        id = Uuid::new_v4(),
        public = random_token(24),
        secret = random_token(32),
    );
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok((path, true))
}

fn random_token(len: usize) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_checkpoint_interval_is_refused() {
        let mut config = Settings::empty();
        config.validate().unwrap();
        config.database.checkpoint_interval_ms = 0;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("checkpoint_interval_ms"), "{error}");
    }
}
