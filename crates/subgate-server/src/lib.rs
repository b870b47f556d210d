//! Subgate's server: configuration, the store chosen from the database URL, and HTTP.

pub mod config;
pub mod copy;
pub mod http;
pub mod stripe;
pub mod webhooks;

use anyhow::{bail, Context as _};
use config::{DatabaseSettings, Settings};
use http::{AppRegistry, Context};
use std::net::SocketAddr;
use std::sync::Arc;
use subgate_core::currency::Rates;
use subgate_core::model::App;
use subgate_core::service::Services;
use subgate_core::store::Store;
use subgate_core::Clock;
use subgate_postgres::{PgOptions, PgStore};
use subgate_sqlite::{SqliteOptions, SqliteStore};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Opens the store the URL's scheme names, applying its migrations. A URL we cannot serve is an
/// error, never a silent fallback to a new SQLite file.
pub async fn open_store(database: &DatabaseSettings) -> anyhow::Result<Arc<dyn Store>> {
    open(database, true).await
}

/// [`open_store`] for a store this process only reads, while its owner may be running (the
/// source of `copy-store`).
pub async fn open_store_for_reading(database: &DatabaseSettings) -> anyhow::Result<Arc<dyn Store>> {
    open(database, false).await
}

async fn open(database: &DatabaseSettings, owner: bool) -> anyhow::Result<Arc<dyn Store>> {
    let url = database.url.as_str();
    if url.starts_with("sqlite:") {
        let path = subgate_sqlite::path_from_url(url).with_context(|| {
            format!("database.url `{url}` names no file; use sqlite://path/to/file.db")
        })?;
        let options = SqliteOptions {
            cached_profiles: database.cached_profiles,
            cached_profiles_mib: database.cached_profiles_mib,
            wal_rewind_pages: database.wal_rewind_pages,
            checkpoint_interval: std::time::Duration::from_millis(database.checkpoint_interval_ms),
        };
        let store = tokio::task::spawn_blocking(move || {
            if owner {
                SqliteStore::open(path, &options)
            } else {
                SqliteStore::open_for_reading(path)
            }
        })
        .await
        .context("opening the SQLite database")??;
        return Ok(Arc::new(store));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let options = PgOptions {
            max_connections: database.max_connections,
        };
        let store = PgStore::connect(url, &options)
            .await
            .with_context(|| format!("cannot use PostgreSQL at `{}`", redact(url)))?;
        return Ok(Arc::new(store));
    }
    bail!(
        "database.url `{}` is not supported: use sqlite://path/to/file.db or postgres://user@host/database",
        redact(url)
    )
}

/// Hides a password in a database URL before it is printed.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// A server bound to its port and running, with its webhook worker.
pub struct Running {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    worker_stop: watch::Sender<bool>,
    worker: Option<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets requests in flight finish, stops the worker after its current
    /// round (an event it was sending is either recorded or sent again later), and waits.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await??;
        let _ = self.worker_stop.send(true);
        if let Some(worker) = self.worker.take() {
            worker.await?;
        }
        Ok(())
    }

    /// Serves until `signal` fires (then stops gracefully) or the server fails.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::select! {
            result = &mut self.task => {
                result??;
                Ok(())
            }
            () = signal => {
                tracing::info!("shutting down");
                self.stop().await
            }
        }
    }
}

/// Applies the apps to the store, binds `settings.server.listen` and serves.
pub async fn start(settings: &Settings, clock: Arc<dyn Clock>) -> anyhow::Result<Running> {
    let store = open_store(&settings.database).await?;
    start_with_store(settings, store, clock).await
}

pub async fn start_with_store(
    settings: &Settings,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Running> {
    let definitions: Vec<_> = settings.apps.iter().map(|a| a.definition()).collect();
    store
        .put_apps(&definitions)
        .await
        .context("saving the configured apps")?;
    let mut apps = AppRegistry::default();
    let mut app_list = Vec::new();
    let mut stripe = std::collections::HashMap::new();
    for (app, definition) in settings.apps.iter().zip(definitions) {
        if let Some(account) = &app.stripe {
            let client = stripe::StripeClient::new(&account.api_base, &account.secret_key)
                .context("setting up the Stripe client")?;
            stripe.insert(definition.id, client);
        }
        let built = Arc::new(App::new(definition).with_webhook(app.webhook.is_some()));
        apps.insert(Arc::clone(&built), &app.public_keys, &app.secret_keys);
        app_list.push(built);
    }
    let rendered = Arc::new(http::rendered::RenderedProfiles::new(&app_list));
    let services = Services {
        store,
        clock,
        rates: Arc::new(Rates::with_overrides(&settings.currency_rates)),
        renderer: Some(Arc::clone(&rendered) as _),
    };
    let worker = webhooks::Worker::new(settings, services.clone(), &app_list)
        .context("setting up webhook delivery")?;
    let ctx = Arc::new(Context {
        services,
        apps,
        rendered,
        renewals: http::rendered::Renewals::default(),
        stripe,
    });
    let listener = TcpListener::bind(&settings.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.server.listen))?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let app = http::router(ctx);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
    });
    let (worker_stop, stop_rx) = watch::channel(false);
    let worker = worker.spawn(stop_rx);
    Ok(Running {
        addr,
        shutdown: Some(tx),
        task,
        worker_stop,
        worker: Some(worker),
    })
}
