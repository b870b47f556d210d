use anyhow::Context;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use subgate_core::clock::Clock as _;
use subgate_core::SystemClock;
use subgate_server::config::{self, DatabaseSettings, Overrides, Settings};

/// Subgate: a self-hosted subscription and entitlement backend, compatible with Adapty's
/// server-side API.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Common {
    /// TOML config file. Without one, subgate-data/subgate.toml is used (and written, with a
    /// demo app, on first start).
    #[arg(long, env = "SUBGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Database URL (overrides the config and SUBGATE_DATABASE_URL).
    #[arg(long)]
    database_url: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API server.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address to listen on (overrides the config and SUBGATE_LISTEN).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Apply the database migrations and exit.
    Migrate {
        #[command(flatten)]
        common: Common,
    },
    /// Send Adapty's endpoint check (an empty JSON object, with the app's Authorization and
    /// signature headers) to an app's webhook URL and report the answer.
    WebhookTest {
        #[command(flatten)]
        common: Common,
        /// The app's name (or id) in the config.
        #[arg(long)]
        app: String,
        /// Use the app's sandbox URL.
        #[arg(long)]
        sandbox: bool,
    },
    /// Copy every app, profile and transaction from one database to another, e.g. from the
    /// SQLite file to PostgreSQL when moving to several nodes. Stop the nodes writing to the
    /// source first.
    CopyStore {
        /// Database to read, e.g. sqlite://subgate-data/subgate.db (must exist).
        #[arg(long)]
        from: String,
        /// Database to write, e.g. postgres://subgate@db.internal/subgate (migrated first).
        #[arg(long)]
        to: String,
        /// Copy even if the target already holds profiles or transactions, replacing rows with
        /// the same keys.
        #[arg(long)]
        overwrite: bool,
    },
}

fn load(common: &Common, listen: Option<String>) -> anyhow::Result<(Settings, Option<PathBuf>)> {
    let overrides = Overrides {
        listen,
        database_url: common.database_url.clone(),
    };
    match &common.config {
        Some(path) => Ok((Settings::load(Some(path), &overrides)?, None)),
        None => {
            let (path, created) = config::demo_config()?;
            if created {
                eprintln!("No config given: wrote a demo config to {}", path.display());
            }
            Ok((Settings::load(Some(&path), &overrides)?, Some(path)))
        }
    }
}

fn print_demo_banner(settings: &Settings, path: &std::path::Path, addr: std::net::SocketAddr) {
    println!(
        "Subgate is listening on http://{addr} (demo config: {})",
        path.display()
    );
    for app in &settings.apps {
        println!("App `{}` ({})", app.name, app.app_id());
        for key in &app.public_keys {
            println!("  public key: {key}");
        }
        for key in &app.secret_keys {
            println!("  secret key: {key}");
        }
    }
    if let Some(key) = settings.apps.first().and_then(|a| a.secret_keys.first()) {
        println!("Try it:");
        println!(
            "  curl -s -X POST http://{addr}/api/v2/server-side-api/profile/ \\\n    -H 'Authorization: Api-Key {key}' \\\n    -H 'adapty-customer-user-id: user-1' -H 'Content-Type: application/json' \\\n    -d '{{\"custom_attributes\": [{{\"key\": \"plan\", \"value\": \"trial\"}}]}}'"
        );
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SUBGATE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: log files and journald get plain text, and
        // each request's span is formatted for less (the colour codes were a third of it).
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Serve { common, listen } => {
            let (settings, demo) = load(&common, listen)?;
            runtime(Some(settings.server.worker_threads()))?.block_on(serve(settings, demo))
        }
        command => runtime(None)?.block_on(run(command)),
    }
}

/// The async runtime, with `worker_threads` threads (the machine's cores if `None`).
fn runtime(worker_threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn serve(settings: Settings, demo: Option<PathBuf>) -> anyhow::Result<()> {
    let running = subgate_server::start(&settings, Arc::new(SystemClock)).await?;
    tracing::info!(addr = %running.addr, database = %subgate_server::redact(&settings.database.url), apps = settings.apps.len(), workers = tokio::runtime::Handle::current().metrics().num_workers(), "serving");
    if let Some(path) = demo {
        print_demo_banner(&settings, &path, running.addr);
    }
    running.run_until(shutdown_signal()).await
}

/// Every command but `serve`.
async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { .. } => unreachable!("`serve` has its own runtime"),
        Command::Migrate { common } => {
            let (settings, _) = load(&common, None)?;
            subgate_server::open_store(&settings.database)
                .await
                .context("migrating")?;
            println!(
                "Database at {} is up to date.",
                subgate_server::redact(&settings.database.url)
            );
            Ok(())
        }
        Command::WebhookTest {
            common,
            app,
            sandbox,
        } => {
            let (settings, _) = load(&common, None)?;
            webhook_test(&settings, &app, sandbox).await
        }
        Command::CopyStore {
            from,
            to,
            overwrite,
        } => copy_store(&from, &to, overwrite).await,
    }
}

async fn webhook_test(settings: &Settings, app: &str, sandbox: bool) -> anyhow::Result<()> {
    use subgate_server::webhooks::Endpoint;
    let config = settings
        .apps
        .iter()
        .find(|a| a.name == app || a.app_id().to_string() == app)
        .with_context(|| format!("no app named `{app}` in the config"))?;
    let webhook = config
        .webhook
        .as_ref()
        .with_context(|| format!("app `{app}` has no [apps.webhook] section"))?;
    let endpoint = Endpoint::from_settings(webhook)?;
    let environment = if sandbox {
        subgate_core::model::Environment::Sandbox
    } else {
        subgate_core::model::Environment::Production
    };
    let url = endpoint.url_for(environment).to_string();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(
            settings.webhooks.timeout_seconds,
        ))
        .build()?;
    let started = std::time::Instant::now();
    let id = format!("test_{}", uuid::Uuid::new_v4().simple());
    let response = endpoint
        .post(&client, &url, &id, b"{}", chrono::Utc::now())
        .await
        .with_context(|| format!("POST {url} failed"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let json = serde_json::from_str::<serde_json::Value>(&body).is_ok();
    println!(
        "POST {url}: {status} in {} ms; answer {}",
        started.elapsed().as_millis(),
        if json { "is JSON" } else { "is not JSON" }
    );
    anyhow::ensure!(
        status.is_success() && json,
        "Adapty expects a 2xx with a JSON body from a new endpoint"
    );
    Ok(())
}

async fn copy_store(from: &str, to: &str, overwrite: bool) -> anyhow::Result<()> {
    use subgate_server::redact;
    if let Some(path) = subgate_sqlite::path_from_url(from) {
        // Opening a missing source would create an empty one and copy nothing.
        anyhow::ensure!(
            path.exists(),
            "the source {} does not exist",
            path.display()
        );
    }
    let database = |url: &str| DatabaseSettings {
        url: url.to_string(),
        ..DatabaseSettings::default()
    };
    let source = subgate_server::open_store_for_reading(&database(from))
        .await
        .context("opening the source")?;
    let target = subgate_server::open_store(&database(to))
        .await
        .context("opening the target")?;
    let report =
        subgate_server::copy::copy_store(&*source, &*target, overwrite, SystemClock.now()).await?;
    println!(
        "Copied {} apps, {} profiles, {} transactions, {} detached transactions and {} events \
         from {} to {}.",
        report.apps,
        report.profiles,
        report.transactions,
        report.detached_transactions,
        report.events,
        redact(from),
        redact(to)
    );
    Ok(())
}
