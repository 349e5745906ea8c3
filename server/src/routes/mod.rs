//! Request handlers, one module per resource.

pub mod blobs;
pub mod lists;
pub mod manifests;
pub mod uploads;
