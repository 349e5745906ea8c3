//! Orlop's registry server: the OCI Distribution 1.1 / Docker Registry HTTP
//! API V2 over the engine. This crate stays thin: HTTP, parsing,
//! validation, and the mapping to engine calls. It never opens RocksDB or a
//! segment file; its rows live in its own column families through the
//! engine's kv and transaction API.
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod app;
pub mod config;
pub mod error;
pub mod gc;
pub mod http;
pub mod manifest;
pub mod meta;
pub mod metrics;
pub mod names;
mod routes;
pub mod scrub;
pub mod serve;
pub mod upload;

pub use config::{ConfigError, ServerConfig};
pub use error::ApiError;
pub use meta::Registry;
pub use serve::{run, run_until, store_config, ServeError};
