//! `orlop serve`: the registry. Settings come from defaults (127.0.0.1:5000,
//! data under ./data), then `--config FILE` (TOML), then `ORLOP_*`
//! environment variables, then these flags.

use anyhow::{Context, Result};
use clap::Args;
use orlop_server::ServerConfig;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args)]
pub struct ServeArgs {
    /// Data directory of the store [default: ./data].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Listen address [default: 127.0.0.1:5000].
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// Key file [default: <data>/store.key, created with mode 0600].
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// TOML configuration file (every setting is in docs/api.md).
    #[arg(long, env = "ORLOP_CONFIG")]
    config: Option<PathBuf>,
}

pub fn run(a: ServeArgs) -> Result<i32> {
    let mut cfg =
        ServerConfig::load(a.config.as_deref(), std::env::vars()).context("configuration")?;
    if let Some(d) = a.data {
        cfg.data = d;
    }
    if let Some(addr) = a.addr {
        cfg.addr = addr;
    }
    if let Some(k) = a.key_file {
        cfg.key_file = Some(k);
    }
    let data = cfg.data.clone();
    orlop_server::run(cfg, |addr| {
        println!(
            "orlop: registry listening on http://{addr} (data in {})",
            data.display()
        );
        let _ = std::io::stdout().flush();
    })
    .context("serving")?;
    Ok(0)
}
