//! Subgate's domain: pure types and rules (no I/O; the current time is always passed in),
//! the [`store::Store`] trait the backends implement, and the use-case services.

pub mod access;
pub mod attributes;
pub mod clock;
pub mod currency;
pub mod error;
pub mod events;
#[cfg(test)]
mod fixtures;
pub mod fnv;
pub mod json;
pub mod model;
pub mod service;
pub mod store;
pub mod time;
pub mod transaction;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{ApiError, ErrorCode};
