//! HTTP tests: each starts the real server on a free port, with its own database and a test
//! clock, and talks to it over HTTP. One binary for all of them, to build once.

mod access;
mod common;
mod concurrency;
mod errors;
mod openapi;
mod profile;
mod restart;
mod transactions;
