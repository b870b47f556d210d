//! HTTP tests: each starts the real server on a free port, with its own database and a test
//! clock, and talks to it over HTTP. One binary for all of them, to build once.

/// Runs each listed `async fn name(backend: Backend)` once per backend, as `sqlite::name` and
/// `postgres::name` (so `cargo test postgres::` runs the PostgreSQL half). A test left out of
/// the list is dead code, which clippy refuses.
macro_rules! on_every_backend {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )+
        }
    };
}

mod access;
mod common;
mod concurrency;
mod errors;
mod nodes;
mod openapi;
mod postgres_only;
mod profile;
mod receiver;
mod restart;
mod sqlite_only;
mod store_contract;
mod stripe;
mod transactions;
mod v1;
mod webhooks;
