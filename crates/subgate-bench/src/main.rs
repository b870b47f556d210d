//! `subgate-bench`: for each backend and size, seeds a database, starts the release `subgate`
//! binary on it as its own process, drives it over loopback from this process, and reports
//! requests/s, latency percentiles and the server's peak memory, as a table and as JSON.

mod load;
mod seed;

use anyhow::{bail, Context as _};
use clap::Parser;
use load::{Outcome, Scenario, Target};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use subgate_server::config::{DatabaseSettings, Overrides, Settings};

const SECRET_KEY: &str = "secret_bench_key";

const CONFIG: &str = r#"
[[apps]]
id = "6a0c2f5e-1b7d-4c3e-9f21-0d5b8e7a4c11"
name = "Bench"
secret_keys = ["secret_bench_key"]

[[apps.access_levels]]
id = "premium"

[[apps.access_levels]]
id = "pro"

[[apps.products]]
id = "monthly"
access_level_id = "premium"
type = "subscription"
store_product_ids = { app_store = "com.bench.monthly" }

[[apps.products]]
id = "lifetime"
access_level_id = "premium"
type = "one_time"
store_product_ids = { app_store = "com.bench.lifetime" }

[[apps.products]]
id = "coins"
type = "consumable"
store_product_ids = { app_store = "com.bench.coins" }
"#;

/// Seeds a database, starts the real server on it and measures it over loopback HTTP.
#[derive(Parser)]
#[command(about)]
struct Args {
    /// Backends to measure: sqlite, postgres.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    backends: Vec<String>,
    /// Seeded profile counts.
    #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
    sizes: Vec<u64>,
    /// Open connections of the load generator.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured seconds per scenario (after a one-second warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Slices each scenario's measured seconds are cut into, each after a slice of the
    /// `/health` run; `x base` is the median of the slices' ratios. Each round runs one slice
    /// at every size, so the sizes are measured over the same minutes.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,get_profile,set_transaction,grant,mixed"
    )]
    scenarios: Vec<String>,
    /// PostgreSQL database; each size gets its own schema there, recreated. By default the
    /// local server's `test` database, through its Unix socket when there is one (as a node on
    /// the database's machine would connect), else over TCP on 127.0.0.1.
    #[arg(long, default_value_t = default_postgres_url())]
    postgres_url: String,
    /// Where the SQLite files, configs and logs go.
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
    /// The JSON report.
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    /// Measured seconds of the `/health` run beside each scenario (in as many slices as the
    /// scenario), which that scenario's `x base` ratio divides by. As long as the scenario's
    /// by default: slices of 0.6 s (3 s in five) varied about three times as much as the
    /// scenario's 2 s slices beside them, and made most of the ratios' noise.
    #[arg(long, default_value_t = 10)]
    baseline_duration: u64,
    /// Sizes up to this are seeded again before a scenario that follows a writing one, so every
    /// scenario meets profiles as seeded (at 10k, one write scenario adds about ten rows to
    /// each profile; at 1M, one row to one profile in ten).
    #[arg(long, default_value_t = 100_000)]
    reseed_up_to: u64,
    /// Keep a database already seeded with exactly this many profiles by an earlier run,
    /// instead of seeding again (for profiling; earlier scenarios' writes stay in it, and
    /// nothing is seeded again between scenarios).
    #[arg(long)]
    reuse: bool,
}

struct Server {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Server {
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

/// CPU seconds process `pid` has used so far, user and system, all threads (the kernel counts
/// them in USER_HZ, 100 a second on Linux).
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// User and system seconds from a `/proc/.../stat` line.
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// CPU seconds of process `pid`'s threads so far, summed by thread name (`tokio-rt-worker`,
/// `sqlite-writer`, ...): which thread a figure's cost sits on tells what limits it, as the
/// one writer thread every write waits for. A thread that ended is no longer counted, so the
/// sums are read over a span in which the server keeps its threads.
fn thread_cpu_seconds(pid: u32) -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue;
        };
        if let Some(seconds) = stat_cpu_seconds(&stat) {
            *by_name.entry(name.trim().to_string()).or_insert(0.0) += seconds;
        }
    }
    by_name
}

/// Bytes process `pid` has had read from storage so far (`read_bytes` of `/proc/<pid>/io`):
/// reads the kernel's page cache served are not in it, so it shows the database's pages the
/// machine had let go of.
fn storage_read_bytes(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// The machine's idle ticks (idle and iowait) and all its ticks so far, over every CPU, from
/// the first line of `/proc/stat` (in USER_HZ, as a process's).
fn machine_ticks() -> Option<(u64, u64)> {
    idle_and_all_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn idle_and_all_ticks(stat: &str) -> Option<(u64, u64)> {
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((idle, ticks.iter().take(8).sum()))
}

/// Where the machine's CPU went while a scenario was measured. The load generator's share,
/// with the server's and the idle share, tells what is left for other processes (PostgreSQL):
/// on these 2-core machines they all share the cores the ratios are measured on.
#[derive(Clone)]
struct CpuUse {
    server_seconds: f64,
    server_threads: BTreeMap<String, f64>,
    /// `None` where `/proc/<pid>/io` could not be read: unknown, not zero.
    server_storage_read_bytes: Option<u64>,
    generator_seconds: f64,
    idle_ticks: u64,
    all_ticks: u64,
}

impl CpuUse {
    fn now(server: &Server) -> Option<CpuUse> {
        let (idle_ticks, all_ticks) = machine_ticks()?;
        let pid = server.child.id();
        Some(CpuUse {
            server_seconds: process_cpu_seconds(pid)?,
            server_threads: thread_cpu_seconds(pid),
            server_storage_read_bytes: storage_read_bytes(pid),
            generator_seconds: process_cpu_seconds(std::process::id())?,
            idle_ticks,
            all_ticks,
        })
    }

    fn since(self, before: CpuUse) -> CpuUse {
        CpuUse {
            server_seconds: self.server_seconds - before.server_seconds,
            server_threads: combine(self.server_threads, &before.server_threads, -1.0),
            server_storage_read_bytes: self
                .server_storage_read_bytes
                .zip(before.server_storage_read_bytes)
                .map(|(now, then)| now.saturating_sub(then)),
            generator_seconds: self.generator_seconds - before.generator_seconds,
            idle_ticks: self.idle_ticks.saturating_sub(before.idle_ticks),
            all_ticks: self.all_ticks.saturating_sub(before.all_ticks),
        }
    }

    /// CPU seconds of everything on the machine but the server and the load generator: mostly
    /// PostgreSQL's backends, when PostgreSQL runs on this machine. The machine's ticks are
    /// sampled apart from the processes' and in coarser units, so a small negative is zero.
    fn rest_seconds(&self) -> f64 {
        let busy = self.all_ticks.saturating_sub(self.idle_ticks) as f64 / 100.0;
        (busy - self.server_seconds - self.generator_seconds).max(0.0)
    }

    fn plus(self, other: CpuUse) -> CpuUse {
        CpuUse {
            server_seconds: self.server_seconds + other.server_seconds,
            server_threads: combine(self.server_threads, &other.server_threads, 1.0),
            server_storage_read_bytes: self
                .server_storage_read_bytes
                .zip(other.server_storage_read_bytes)
                .map(|(a, b)| a + b),
            generator_seconds: self.generator_seconds + other.generator_seconds,
            idle_ticks: self.idle_ticks + other.idle_ticks,
            all_ticks: self.all_ticks + other.all_ticks,
        }
    }
}

/// `into` plus `sign` times `other`, name by name (a name only one side has counts as zero on
/// the other).
fn combine(
    mut into: BTreeMap<String, f64>,
    other: &BTreeMap<String, f64>,
    sign: f64,
) -> BTreeMap<String, f64> {
    for (name, seconds) in other {
        *into.entry(name.clone()).or_insert(0.0) += sign * seconds;
    }
    into
}

impl Drop for Server {
    /// Stops the server as an operator would (SIGTERM, through `kill`, so no signal crate is
    /// needed), so a SQLite node empties its WAL and a `--reuse` run starts from a clean file.
    /// Killed after 30 s.
    fn drop(&mut self) {
        let terminated = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        while terminated && Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("subgate");
    if !bin.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release --bins)",
            bin.display()
        );
    }
    Ok(bin)
}

async fn start_server(dir: &Path, config: &Path, url: &str) -> anyhow::Result<Server> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let log = std::fs::File::create(dir.join(format!("server-{port}.log")))?;
    let child = Command::new(server_binary()?)
        .args(["serve", "--config"])
        .arg(config)
        .args(["--listen", &addr.to_string(), "--database-url", url])
        .env("SUBGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let mut server = Server { child, addr };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!("the server exited ({status}); see {}", dir.display());
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(server);
        }
        if Instant::now() > deadline {
            bail!("the server did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fresh database URL for `backend` at `size`.
/// The load (and its VACUUM) wrote gigabytes of WAL; without a checkpoint now, PostgreSQL
/// starts one during the measured writes, which then pay its full-page images. Best effort:
/// CHECKPOINT needs a superuser or `pg_checkpoint`.
async fn checkpoint(url: &str) {
    let result = async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client.batch_execute("CHECKPOINT").await
    }
    .await;
    if let Err(e) = result {
        eprintln!("postgres: no checkpoint after seeding ({e}); writes may pay for one");
    }
}

async fn fresh_database(
    args: &Args,
    backend: &str,
    size: u64,
    reuse: bool,
) -> anyhow::Result<String> {
    match backend {
        "sqlite" => {
            let path = args.dir.join(format!("bench-{size}.db"));
            if reuse {
                return Ok(format!("sqlite://{}", path.display()));
            }
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
            Ok(format!("sqlite://{}", path.display()))
        }
        "postgres" => {
            let schema = format!("subgate_bench_{size}");
            let (client, connection) =
                tokio_postgres::connect(&args.postgres_url, tokio_postgres::NoTls)
                    .await
                    .with_context(|| format!("connecting to {}", args.postgres_url))?;
            tokio::spawn(connection);
            let recreate = if reuse {
                format!("CREATE SCHEMA IF NOT EXISTS {schema}")
            } else {
                format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}")
            };
            client.batch_execute(&recreate).await?;
            let separator = if args.postgres_url.contains('?') {
                '&'
            } else {
                '?'
            };
            Ok(format!(
                "{}{separator}options=-csearch_path%3D{schema}",
                args.postgres_url
            ))
        }
        other => bail!("unknown backend `{other}` (sqlite or postgres)"),
    }
}

/// One run of a scenario, and where the CPU went over its measured part.
struct Measured {
    outcome: Outcome,
    cpu: Option<CpuUse>,
}

impl Measured {
    /// `amount` of the measured span divided by its requests.
    fn per_request(&self, amount: impl Fn(&CpuUse) -> Option<f64>) -> Option<f64> {
        self.cpu
            .as_ref()
            .filter(|_| self.outcome.requests > 0)
            .and_then(amount)
            .map(|amount| amount / self.outcome.requests as f64)
    }

    fn per_request_us(&self, seconds: impl Fn(&CpuUse) -> f64) -> Option<f64> {
        self.per_request(|cpu| Some(seconds(cpu))).map(|s| s * 1e6)
    }

    fn idle_percent(&self) -> Option<f64> {
        self.cpu
            .as_ref()
            .filter(|cpu| cpu.all_ticks > 0)
            .map(|cpu| cpu.idle_ticks as f64 / cpu.all_ticks as f64 * 100.0)
    }

    fn merge(self, other: Measured) -> anyhow::Result<Measured> {
        Ok(Measured {
            outcome: self.outcome.merge(other.outcome)?,
            cpu: self.cpu.zip(other.cpu).map(|(a, b)| a.plus(b)),
        })
    }
}

/// Runs one scenario and measures where the CPU went over its measured part.
async fn measure(
    server: &Server,
    target: &Arc<Target>,
    scenario: Scenario,
    args: &Args,
    (warmup, duration): (Duration, Duration),
    rate: Option<f64>,
) -> anyhow::Result<Measured> {
    let load = load::run(target, scenario, args.concurrency, warmup, duration, rate);
    let sample = async {
        tokio::time::sleep(warmup).await;
        CpuUse::now(server)
    };
    let (outcome, before) = tokio::join!(load, sample);
    let outcome = outcome?;
    let cpu = before
        .zip(CpuUse::now(server))
        .map(|(before, after)| after.since(before));
    Ok(Measured { outcome, cpu })
}

/// Warm-up of a slice after the first: the connections are new, the server is warm.
const SLICE_WARMUP: Duration = Duration::from_millis(250);

/// One size's server, seeded, and what the run learned about it.
struct Node {
    size: u64,
    server: Server,
    target: Arc<Target>,
    seed_seconds: Option<f64>,
    /// The highest peak RSS of the servers this size's database had before the current one.
    earlier_peak_rss_kib: u64,
}

impl Node {
    async fn start(
        args: &Args,
        backend: &str,
        size: u64,
        config_path: &Path,
        reuse: bool,
    ) -> anyhow::Result<Node> {
        let (server, seed_seconds) = prepare(args, backend, size, config_path, reuse).await?;
        Ok(Node {
            size,
            target: Arc::new(Target {
                addr: server.addr,
                secret_key: SECRET_KEY.to_string(),
                profiles: size,
            }),
            server,
            seed_seconds,
            earlier_peak_rss_kib: 0,
        })
    }

    /// Stops the server, seeds its database again and starts a new server on it.
    async fn reseed(self, args: &Args, backend: &str, config_path: &Path) -> anyhow::Result<Node> {
        let (size, earlier_peak_rss_kib, seed_seconds) =
            (self.size, self.peak_rss_kib(), self.seed_seconds);
        // The old server must be gone before its database is replaced.
        drop(self);
        let node = Node::start(args, backend, size, config_path, false).await?;
        Ok(Node {
            earlier_peak_rss_kib,
            seed_seconds,
            ..node
        })
    }

    fn peak_rss_kib(&self) -> u64 {
        self.earlier_peak_rss_kib
            .max(self.server.peak_rss_kib().unwrap_or(0))
    }
}

/// A scenario's figures at one size: its measurement, the `/health` rate beside it and its
/// ratio to that rate, and the rounds' slices that ratio was taken from.
struct Figures {
    measured: Measured,
    base_rate: f64,
    ratio: f64,
    slices: Vec<Slice>,
}

/// One round at one size: the rate of its `/health` slice and of the scenario's slice right
/// after it. Kept in the JSON, so that a ratio far from the run's others can be traced to the
/// slice it came from.
#[derive(Debug, Clone, Copy)]
struct Slice {
    base_rate: f64,
    rate: f64,
}

impl Slice {
    fn ratio(self) -> f64 {
        self.rate / self.base_rate.max(f64::MIN_POSITIVE)
    }
}

/// The median of the slices' ratios, which one slice the machine's speed changed in does not
/// move.
fn median_ratio(slices: &[Slice]) -> f64 {
    median(&mut slices.iter().map(|s| s.ratio()).collect::<Vec<_>>())
}

/// A scenario beside `/health`, at every size in turn. This machine's speed changes by a
/// factor of two from one minute to the next: one `/health` run before a scenario was often
/// measured at the other speed, and sizes measured minutes apart met different machines. So
/// the scenario runs in `--rounds` rounds; in each, every size gets a slice of `/health` and
/// right after it a slice of the scenario, the sizes' order swapped from one round to the next.
/// A size's ratio is the median of its slices' ratios, which a slice the speed changed in does
/// not move, and the sizes' figures come from the same minutes. Returns, for each node, the
/// scenario's slices as one measurement, the `/health` rate over its slices and that median.
async fn measure_beside_baseline(
    nodes: &[Node],
    scenario: Scenario,
    args: &Args,
) -> anyhow::Result<Vec<Figures>> {
    #[derive(Default)]
    struct Tally {
        merged: Option<Measured>,
        base_requests: u64,
        base_seconds: f64,
        slices: Vec<Slice>,
    }
    let rounds = args.rounds.max(1);
    let slice = |seconds: u64| Duration::from_secs_f64(seconds as f64 / f64::from(rounds));
    let mut tallies: Vec<Tally> = nodes.iter().map(|_| Tally::default()).collect();
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..nodes.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (node, tally) = (&nodes[i], &mut tallies[i]);
            let base = measure(
                &node.server,
                &node.target,
                Scenario::Baseline,
                args,
                (SLICE_WARMUP, slice(args.baseline_duration)),
                None,
            )
            .await?;
            let warmup = if round == 0 {
                Duration::from_secs(1)
            } else {
                SLICE_WARMUP
            };
            let part = measure(
                &node.server,
                &node.target,
                scenario,
                args,
                (warmup, slice(args.duration)),
                None,
            )
            .await?;
            tally.slices.push(Slice {
                base_rate: base.outcome.rate(),
                rate: part.outcome.rate(),
            });
            tally.base_requests += base.outcome.requests;
            tally.base_seconds += base.outcome.seconds;
            tally.merged = Some(match tally.merged.take() {
                None => part,
                Some(so_far) => so_far.merge(part)?,
            });
        }
    }
    tallies
        .into_iter()
        .map(|t| {
            Ok(Figures {
                measured: t.merged.context("no rounds were run")?,
                base_rate: t.base_requests as f64 / t.base_seconds,
                ratio: median_ratio(&t.slices),
                slices: t.slices,
            })
        })
        .collect()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// A table row; `baseline` is the `/health` rate beside the scenario and the ratio to it,
/// `slices` the rounds that ratio came from (none for a row measured in one piece).
fn row(
    backend: &str,
    size: u64,
    name: &str,
    measured: &Measured,
    (baseline, ratio): (f64, f64),
    slices: &[Slice],
) -> Value {
    let outcome = &measured.outcome;
    let tenths = |v: Option<f64>| v.map(|v| (v * 10.0).round() / 10.0);
    let thousandths = |v: f64| (v * 1000.0).round() / 1000.0;
    let thread_names = measured.cpu.iter().flat_map(|c| c.server_threads.keys());
    json!({
        "backend": backend,
        "profiles": size,
        "scenario": name,
        "requests_per_second": outcome.rate().round(),
        "baseline_requests_per_second": baseline.round(),
        "ratio_to_baseline": thousandths(ratio),
        "p50_ms": outcome.percentile_ms(0.5),
        "p99_ms": outcome.percentile_ms(0.99),
        "p999_ms": outcome.percentile_ms(0.999),
        "errors": outcome.errors,
        "server_cpu_us_per_request": tenths(measured.per_request_us(|c| c.server_seconds)),
        "generator_cpu_us_per_request": tenths(measured.per_request_us(|c| c.generator_seconds)),
        "rest_cpu_us_per_request": tenths(measured.per_request_us(CpuUse::rest_seconds)),
        "server_thread_cpu_us_per_request": thread_names
            .map(|name| {
                let seconds = |c: &CpuUse| c.server_threads.get(name).copied().unwrap_or(0.0);
                (name.clone(), tenths(measured.per_request_us(seconds)))
            })
            .collect::<BTreeMap<_, _>>(),
        "server_storage_read_bytes_per_request": tenths(
            measured.per_request(|c| c.server_storage_read_bytes.map(|b| b as f64))
        ),
        "machine_idle_percent": tenths(measured.idle_percent()),
        "slices": slices
            .iter()
            .map(|s| json!({
                "baseline_requests_per_second": s.base_rate.round(),
                "requests_per_second": s.rate.round(),
                "ratio_to_baseline": thousandths(s.ratio()),
            }))
            .collect::<Vec<_>>(),
    })
}

fn print_row(r: &Value) {
    let tenth = |v: &Value| v.as_f64().map_or("-".to_string(), |v| format!("{v:.1}"));
    println!(
        "{:<9} {:>8} {:<16} {:>9.0} {:>9.0} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>7} {:>7} {:>6} {:>7} {:>6}",
        r["backend"].as_str().unwrap_or(""),
        r["profiles"].as_u64().unwrap_or(0),
        r["scenario"].as_str().unwrap_or(""),
        r["requests_per_second"].as_f64().unwrap_or(0.0),
        r["baseline_requests_per_second"].as_f64().unwrap_or(0.0),
        r["ratio_to_baseline"]
            .as_f64()
            .map_or("-".to_string(), |v| format!("{v:.3}")),
        r["p50_ms"].as_f64().unwrap_or(0.0),
        r["p99_ms"].as_f64().unwrap_or(0.0),
        r["p999_ms"].as_f64().unwrap_or(0.0),
        tenth(&r["server_cpu_us_per_request"]),
        tenth(&r["generator_cpu_us_per_request"]),
        tenth(&r["rest_cpu_us_per_request"]),
        tenth(&r["machine_idle_percent"]),
        r["server_storage_read_bytes_per_request"]
            .as_f64()
            .map_or("-".to_string(), |v| format!("{v:.0}")),
        r["errors"],
    );
}

/// A database for `backend` at `size`, seeded unless `reuse` finds it seeded, and the server
/// started on it; with the seconds seeding took.
async fn prepare(
    args: &Args,
    backend: &str,
    size: u64,
    config_path: &Path,
    reuse: bool,
) -> anyhow::Result<(Server, Option<f64>)> {
    let url = fresh_database(args, backend, size, reuse).await?;
    let settings = Settings::load(
        Some(config_path),
        &Overrides {
            listen: None,
            database_url: Some(url.clone()),
        },
    )?;
    let app = settings.apps[0].definition();
    let seconds = {
        let store = subgate_server::open_store(&DatabaseSettings {
            url: url.clone(),
            max_connections: 8,
            ..DatabaseSettings::default()
        })
        .await?;
        store.put_apps(std::slice::from_ref(&app)).await?;
        let seeded = store.counts().await?.profiles;
        if reuse && seeded == size {
            eprintln!("{backend}: reusing the {size} profiles seeded before");
            None
        } else {
            if reuse && seeded != 0 {
                bail!("{backend}: the database holds {seeded} profiles, not {size}: run without --reuse");
            }
            eprintln!("{backend}: seeding {size} profiles");
            let seconds = seed::seed(&*store, &app, size).await?;
            store.after_bulk_load().await?;
            drop(store);
            if backend == "postgres" {
                checkpoint(&args.postgres_url).await;
            }
            eprintln!(
                "{backend}: seeded {size} profiles in {seconds:.1} s ({:.0}/s)",
                size as f64 / seconds
            );
            Some(seconds)
        }
    };
    // Let the seeding store's connections close before the server opens its own.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = start_server(&args.dir, config_path, &url).await?;
    Ok((server, seconds))
}

/// Each scenario at the largest size against the same at the smallest: the scale target.
fn scale(rows: &[Value], sizes: &[u64]) -> Vec<Value> {
    let (Some(&small), Some(&large)) = (sizes.iter().min(), sizes.iter().max()) else {
        return Vec::new();
    };
    if small == large {
        return Vec::new();
    }
    let find = |backend: &str, size: u64, scenario: &str| {
        rows.iter()
            .find(|r| r["backend"] == backend && r["profiles"] == size && r["scenario"] == scenario)
    };
    let change = |a: Option<f64>, b: Option<f64>| {
        a.zip(b)
            .filter(|(a, _)| *a > 0.0)
            .map(|(a, b)| ((b / a - 1.0) * 1000.0).round() / 10.0)
    };
    let mut out = Vec::new();
    for r in rows.iter().filter(|r| r["profiles"] == small) {
        let (backend, scenario) = (
            r["backend"].as_str().unwrap_or(""),
            r["scenario"].as_str().unwrap_or(""),
        );
        let Some(l) = find(backend, large, scenario) else {
            continue;
        };
        out.push(json!({
            "backend": backend,
            "scenario": scenario,
            "from_profiles": small,
            "to_profiles": large,
            "requests_per_second_change_percent": change(
                r["requests_per_second"].as_f64(),
                l["requests_per_second"].as_f64(),
            ),
            "ratio_to_baseline_change_percent": change(
                r["ratio_to_baseline"].as_f64(),
                l["ratio_to_baseline"].as_f64(),
            ),
        }));
    }
    out
}

/// Debian's socket directory for the local PostgreSQL.
const POSTGRES_SOCKET_DIR: &str = "/var/run/postgresql";

/// The local server's `test` database: through its Unix socket when it has one. Over loopback
/// TCP, PostgreSQL writes came to about a fifth fewer a second on session 21's machine (both
/// sides pay the TCP stack for each of a write's round trips).
fn default_postgres_url() -> String {
    if Path::new(POSTGRES_SOCKET_DIR)
        .join(".s.PGSQL.5432")
        .exists()
    {
        // A socket directory is the URL's host, its slashes percent-encoded.
        let host = POSTGRES_SOCKET_DIR.replace('/', "%2F");
        format!("postgres://postgres@{host}/test")
    } else {
        "postgres://postgres@127.0.0.1:5432/test".into()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let scenarios = args
        .scenarios
        .iter()
        .map(|s| Scenario::parse(s).with_context(|| format!("unknown scenario `{s}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config_path = args.dir.join("bench.toml");
    std::fs::write(&config_path, CONFIG)?;
    let mut rows = Vec::new();
    let mut servers = Vec::new();
    println!(
        "concurrency {}, {} s per scenario in {} slices, each after a slice of /health ({} s in \
         all, `base/s`); `x base` is the median of the slices' ratios; latencies in ms; CPU \
         time per request of the server (`cpu µs`), of this load generator (`gen µs`) and of \
         the rest of the machine (`rest µs`: PostgreSQL's backends, when it runs here), \
         the share of the machine's CPU time left idle, and the bytes a request the server had \
         read from the disk rather than the kernel's page cache (`disk B`)",
        args.concurrency, args.duration, args.rounds, args.baseline_duration
    );
    if args.backends.iter().any(|b| b == "postgres") {
        println!("PostgreSQL at {}", args.postgres_url);
    }
    println!(
        "{:<9} {:>8} {:<16} {:>9} {:>9} {:>7} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>6} {:>7} {:>6}",
        "backend",
        "profiles",
        "scenario",
        "req/s",
        "base/s",
        "x base",
        "p50",
        "p99",
        "p99.9",
        "cpu µs",
        "gen µs",
        "rest µs",
        "idle %",
        "disk B",
        "errors"
    );
    for backend in &args.backends {
        // Every size's server runs from the start, so each scenario can measure the sizes in
        // turns over the same minutes.
        let mut nodes = Vec::new();
        for &size in &args.sizes {
            nodes.push(Node::start(&args, backend, size, &config_path, args.reuse).await?);
        }
        let mut written = false;
        for &scenario in &scenarios {
            if written && !args.reuse {
                let mut reseeded = Vec::with_capacity(nodes.len());
                for node in nodes {
                    reseeded.push(if node.size <= args.reseed_up_to {
                        node.reseed(&args, backend, &config_path).await?
                    } else {
                        node
                    });
                }
                nodes = reseeded;
                written = false;
            }
            let full_run = (Duration::from_secs(1), Duration::from_secs(args.duration));
            let measured = if scenario == Scenario::Baseline {
                let mut measured = Vec::new();
                for node in &nodes {
                    let m = measure(&node.server, &node.target, scenario, &args, full_run, None)
                        .await?;
                    measured.push(Figures {
                        base_rate: m.outcome.rate(),
                        measured: m,
                        ratio: 1.0,
                        slices: Vec::new(),
                    });
                }
                measured
            } else {
                measure_beside_baseline(&nodes, scenario, &args).await?
            };
            for (node, f) in nodes.iter().zip(&measured) {
                let r = row(
                    backend,
                    node.size,
                    scenario.name(),
                    &f.measured,
                    (f.base_rate, f.ratio),
                    &f.slices,
                );
                print_row(&r);
                rows.push(r);
            }
            if scenario == Scenario::GetProfile {
                // Latency at half the peak rate: what a user sees when the server has room.
                for (node, f) in nodes.iter().zip(&measured) {
                    let peak = &f.measured;
                    let half = peak.outcome.rate() / 2.0;
                    let paced = measure(
                        &node.server,
                        &node.target,
                        scenario,
                        &args,
                        full_run,
                        Some(half),
                    )
                    .await?;
                    // Its ratio scales the peak's by the rate the pacing reached.
                    let share = paced.outcome.rate() / peak.outcome.rate().max(1.0);
                    let r = row(
                        backend,
                        node.size,
                        "get_profile@50%",
                        &paced,
                        (f.base_rate, f.ratio * share),
                        &[],
                    );
                    print_row(&r);
                    rows.push(r);
                    // `/health` paced at the same rate: the latency the load generator and
                    // the machine's scheduling add at that rate, whatever the route answers.
                    let floor = measure(
                        &node.server,
                        &node.target,
                        Scenario::Baseline,
                        &args,
                        full_run,
                        Some(half),
                    )
                    .await?;
                    let floor_ratio = floor.outcome.rate() / f.base_rate.max(1.0);
                    let r = row(
                        backend,
                        node.size,
                        "baseline@paced",
                        &floor,
                        (f.base_rate, floor_ratio),
                        &[],
                    );
                    print_row(&r);
                    rows.push(r);
                }
            }
            written |= scenario.writes();
        }
        for node in &nodes {
            let rss = Some(node.peak_rss_kib()).filter(|&k| k > 0);
            let size = node.size;
            println!(
                "{backend:<9} {size:>8} server peak RSS {} MiB; seeding {} profiles/s",
                rss.map_or("?".to_string(), |k| format!("{:.1}", k as f64 / 1024.0)),
                node.seed_seconds
                    .map_or("-".to_string(), |s| format!("{:.0}", size as f64 / s))
            );
            servers.push(json!({
                "backend": backend,
                "profiles": size,
                "peak_rss_mib": rss.map(|k| (k as f64 / 1024.0 * 10.0).round() / 10.0),
                "seed_seconds": node.seed_seconds.map(|s| (s * 10.0).round() / 10.0),
            }));
        }
    }
    let scale = scale(&rows, &args.sizes);
    if !scale.is_empty() {
        println!("at the largest size against the smallest, change in %:");
        println!(
            "{:<9} {:<16} {:>8} {:>8}",
            "backend", "scenario", "req/s", "x base"
        );
        for s in &scale {
            let percent = |v: &Value| v.as_f64().map_or("-".to_string(), |p| format!("{p:+.1}"));
            println!(
                "{:<9} {:<16} {:>8} {:>8}",
                s["backend"].as_str().unwrap_or(""),
                s["scenario"].as_str().unwrap_or(""),
                percent(&s["requests_per_second_change_percent"]),
                percent(&s["ratio_to_baseline_change_percent"]),
            );
        }
    }
    let report = json!({
        "date": chrono::Utc::now().to_rfc3339(),
        "concurrency": args.concurrency,
        "duration_seconds": args.duration,
        "baseline_duration_seconds": args.baseline_duration,
        "rounds": args.rounds,
        "postgres_url": args.postgres_url,
        "results": rows,
        "servers": servers,
        "scale": scale,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("written {}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rest_is_the_busy_time_the_server_and_generator_did_not_use() {
        let cpu = |server_seconds, idle_ticks| CpuUse {
            server_seconds,
            server_threads: BTreeMap::new(),
            server_storage_read_bytes: None,
            generator_seconds: 0.5,
            idle_ticks,
            all_ticks: 400,
        };
        // 350 busy ticks are 3.5 s, of which the server and the generator used 1.5.
        assert_eq!(cpu(1.0, 50).rest_seconds(), 2.0);
        // Sampled apart, the processes may seem to have used more than the machine.
        assert_eq!(cpu(3.2, 50).rest_seconds(), 0.0);
    }

    #[test]
    fn the_ratio_is_the_median_of_the_slices_ratios_and_each_slice_is_reported() {
        let slices = [
            Slice {
                base_rate: 100.0,
                rate: 60.0,
            },
            // A slice whose `/health` half met a slower machine: it does not move the median.
            Slice {
                base_rate: 50.0,
                rate: 60.0,
            },
            Slice {
                base_rate: 100.0,
                rate: 50.0,
            },
        ];
        assert!((median_ratio(&slices) - 0.6).abs() < 1e-9);
        let measured = Measured {
            outcome: Outcome {
                requests: 0,
                errors: 0,
                seconds: 1.0,
                latency_us: hdrhistogram::Histogram::new(3).expect("a valid precision"),
            },
            cpu: None,
        };
        let r = row("sqlite", 10, "get_profile", &measured, (80.0, 0.6), &slices);
        let reported: Vec<f64> = r["slices"]
            .as_array()
            .expect("slices are listed")
            .iter()
            .map(|s| {
                s["ratio_to_baseline"]
                    .as_f64()
                    .expect("each slice has its ratio")
            })
            .collect();
        assert_eq!(reported, [0.6, 1.2, 0.5]);
        assert_eq!(r["slices"][1]["baseline_requests_per_second"], 50.0);
    }

    #[test]
    fn thread_sums_are_taken_name_by_name() {
        let at = |pairs: &[(&str, f64)]| -> BTreeMap<String, f64> {
            pairs.iter().map(|(n, s)| (n.to_string(), *s)).collect()
        };
        let later = at(&[("sqlite-writer", 3.0), ("tokio-rt-worker", 5.0)]);
        let earlier = at(&[("sqlite-writer", 1.0), ("gone", 0.5)]);
        assert_eq!(
            combine(later, &earlier, -1.0),
            at(&[
                ("gone", -0.5),
                ("sqlite-writer", 2.0),
                ("tokio-rt-worker", 5.0)
            ])
        );
        // The process's own threads: this test's thread is among them, with some CPU.
        let own = thread_cpu_seconds(std::process::id());
        assert!(
            !own.is_empty() && own.values().all(|s| *s >= 0.0),
            "{own:?}"
        );
        assert_eq!(
            stat_cpu_seconds("12 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0"),
            Some(3.0)
        );
    }

    #[test]
    fn idle_ticks_are_idle_and_iowait_of_the_first_eight_counters() {
        let stat = "cpu  100 5 50 800 20 3 7 15 40 0\ncpu0 50 2 25 400 10 1 3 7 20 0\n";
        // Guest time (the ninth counter) is already counted in user time.
        assert_eq!(idle_and_all_ticks(stat), Some((820, 1000)));
        assert_eq!(idle_and_all_ticks("intr 1 2 3\n"), None);
    }
}
