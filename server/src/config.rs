//! Server configuration: built-in defaults (an embedded single node under
//! ./data on 127.0.0.1:5000), then a TOML file, then `ORLOP_*` environment
//! variables, then command-line flags, each overriding the one before.

use orlop_engine::StoreConfig;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listen address.
    pub addr: SocketAddr,
    /// Data directory of the store.
    pub data: PathBuf,
    /// Key file (default: `<data>/store.key`, created with mode 0600).
    pub key_file: Option<PathBuf>,
    /// Largest manifest accepted (the spec asks for at least 4 MiB).
    pub manifest_bytes_max: u64,
    /// Largest blob accepted, across all requests of one upload.
    pub blob_bytes_max: u64,
    /// Upload sessions open at once; more get 429 TOOMANYREQUESTS.
    pub upload_sessions_max: usize,
    /// Request bodies streaming into the engine at once; more wait.
    pub uploads_streaming_max: usize,
    /// Blob responses streaming out of the engine at once; more wait.
    pub downloads_streaming_max: usize,
    /// An upload session idle this long is cancelled and its data released.
    pub upload_expiry_secs: u64,
    /// Connections served at once; more wait in the listen backlog.
    pub connections_max: usize,
    /// Connections that read their requests 1 MiB at a time rather than
    /// 64 KiB (the first ones accepted while fewer hold a large buffer): a
    /// body streams in with a window update per MiB instead of one per
    /// 64 KiB, for a bounded cost in memory (about 3 MiB a busy
    /// connection). 0 reads every connection 64 KiB at a time.
    pub large_read_connections_max: usize,
    /// Largest page of tags, repositories or referrers returned.
    pub list_page_max: usize,
    /// How long a graceful shutdown waits for requests in flight.
    pub shutdown_grace_secs: u64,
    /// Time allowed to receive a request's head.
    pub request_head_timeout_secs: u64,
    /// Whether DELETE of blobs and manifests is allowed.
    pub delete_enabled: bool,
    /// Time between online garbage collections; 0 turns them off.
    pub gc_interval_secs: u64,
    /// Blobs committed more recently than this are never collected (it
    /// covers the gap between an upload's commit and its first reference).
    pub gc_grace_secs: u64,
    /// Each collection also deletes manifests untagged (and named by no
    /// index, and not a referrer) for this long; 0 keeps them.
    pub gc_untagged_age_secs: u64,
    /// After each collection, segments whose live bytes are at most this
    /// fraction of their data are compacted (0 to 1; 0 compacts only
    /// segments with nothing live).
    pub compact_live_fraction_max: f64,
    /// Bytes compaction copies per second at most, so that pushes and
    /// pulls keep their speed.
    pub compact_bytes_per_sec_max: u64,
    /// Time between scrub passes, which re-read and check every sealed
    /// segment (the first starts 10 minutes after startup, or one interval
    /// if that is shorter); 0 turns the scrub off.
    pub scrub_interval_secs: u64,
    /// Bytes the scrub reads per second at most.
    pub scrub_bytes_per_sec_max: u64,
    /// Size at which the engine seals a segment file (and so the unit
    /// compaction frees). Applies to segments created from now on; sealed
    /// ones keep the size they were written with. The engine's bounds
    /// apply: at least 4 x (largest chunk + 1 KiB), at most 4 GiB - 1.
    pub segment_bytes: u64,
    /// Appends reach segment files with O_DIRECT (in whole blocks from an
    /// aligned buffer), bypassing the page cache; `false` writes the same
    /// blocks through the page cache. Blob reads follow: direct reads of
    /// whole spans, or reads through the page cache. File systems that
    /// refuse O_DIRECT get buffered I/O either way.
    pub segment_direct_io: bool,
    /// An upload that starts while this many are being written (itself
    /// included) cuts and appends on its own thread rather than on two
    /// more: with many uploads at once the cores are busy anyway, and
    /// hand-offs between threads cost more than they spread. Defaults to
    /// the number of cores.
    pub write_inline_from_writers: usize,
}

/// Largest `connections_max`: far above what one process serves, far
/// below a semaphore's limit.
const CONNECTIONS_MAX_LIMIT: usize = 1 << 20;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 5000)),
            data: PathBuf::from("./data"),
            key_file: None,
            manifest_bytes_max: 4 << 20,
            blob_bytes_max: 64 << 30,
            upload_sessions_max: 256,
            uploads_streaming_max: 16,
            upload_expiry_secs: 3600,
            downloads_streaming_max: 256,
            connections_max: 1024,
            large_read_connections_max: 8,
            list_page_max: 1000,
            shutdown_grace_secs: 30,
            request_head_timeout_secs: 30,
            delete_enabled: true,
            gc_interval_secs: 3600,
            gc_grace_secs: 3600,
            gc_untagged_age_secs: 0,
            compact_live_fraction_max: 0.5,
            compact_bytes_per_sec_max: 64 << 20,
            scrub_interval_secs: 7 * 86_400,
            scrub_bytes_per_sec_max: 32 << 20,
            segment_bytes: StoreConfig::new("").segment_bytes,
            segment_direct_io: true,
            write_inline_from_writers: StoreConfig::new("").write_inline_from_writers,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}={value:?}: {message}")]
    Env {
        var: String,
        value: String,
        message: String,
    },
    #[error("invalid setting: {0}")]
    Invalid(String),
}

impl ServerConfig {
    /// Loads the file (when given) over the defaults, then applies `env`.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?
            }
            None => ServerConfig::default(),
        };
        for (var, value) in env {
            cfg.apply_env(&var, &value)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies one `ORLOP_<SETTING>` variable; others are ignored.
    fn apply_env(&mut self, var: &str, value: &str) -> Result<(), ConfigError> {
        let Some(name) = var.strip_prefix("ORLOP_") else {
            return Ok(());
        };
        let bad = |message: String| ConfigError::Env {
            var: var.to_string(),
            value: value.to_string(),
            message,
        };
        fn num<T: std::str::FromStr>(v: &str) -> Result<T, String>
        where
            T::Err: std::fmt::Display,
        {
            v.trim().parse::<T>().map_err(|e| e.to_string())
        }
        match name {
            "ADDR" => self.addr = num(value).map_err(bad)?,
            "DATA" => self.data = PathBuf::from(value),
            "KEY_FILE" => self.key_file = Some(PathBuf::from(value)),
            "MANIFEST_BYTES_MAX" => self.manifest_bytes_max = num(value).map_err(bad)?,
            "BLOB_BYTES_MAX" => self.blob_bytes_max = num(value).map_err(bad)?,
            "UPLOAD_SESSIONS_MAX" => self.upload_sessions_max = num(value).map_err(bad)?,
            "UPLOADS_STREAMING_MAX" => self.uploads_streaming_max = num(value).map_err(bad)?,
            "DOWNLOADS_STREAMING_MAX" => self.downloads_streaming_max = num(value).map_err(bad)?,
            "UPLOAD_EXPIRY_SECS" => self.upload_expiry_secs = num(value).map_err(bad)?,
            "CONNECTIONS_MAX" => self.connections_max = num(value).map_err(bad)?,
            "LARGE_READ_CONNECTIONS_MAX" => {
                self.large_read_connections_max = num(value).map_err(bad)?
            }
            "LIST_PAGE_MAX" => self.list_page_max = num(value).map_err(bad)?,
            "SHUTDOWN_GRACE_SECS" => self.shutdown_grace_secs = num(value).map_err(bad)?,
            "REQUEST_HEAD_TIMEOUT_SECS" => {
                self.request_head_timeout_secs = num(value).map_err(bad)?
            }
            "DELETE_ENABLED" => self.delete_enabled = num(value).map_err(bad)?,
            "GC_INTERVAL_SECS" => self.gc_interval_secs = num(value).map_err(bad)?,
            "GC_GRACE_SECS" => self.gc_grace_secs = num(value).map_err(bad)?,
            "GC_UNTAGGED_AGE_SECS" => self.gc_untagged_age_secs = num(value).map_err(bad)?,
            "COMPACT_LIVE_FRACTION_MAX" => {
                self.compact_live_fraction_max = num(value).map_err(bad)?
            }
            "COMPACT_BYTES_PER_SEC_MAX" => {
                self.compact_bytes_per_sec_max = num(value).map_err(bad)?
            }
            "SCRUB_INTERVAL_SECS" => self.scrub_interval_secs = num(value).map_err(bad)?,
            "SCRUB_BYTES_PER_SEC_MAX" => self.scrub_bytes_per_sec_max = num(value).map_err(bad)?,
            "SEGMENT_BYTES" => self.segment_bytes = num(value).map_err(bad)?,
            "SEGMENT_DIRECT_IO" => self.segment_direct_io = num(value).map_err(bad)?,
            "WRITE_INLINE_FROM_WRITERS" => {
                self.write_inline_from_writers = num(value).map_err(bad)?
            }
            // Variables of other commands (ORLOP_LOG, ORLOP_STORE_KEY, ...).
            _ => {}
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("manifest_bytes_max", self.manifest_bytes_max),
            ("blob_bytes_max", self.blob_bytes_max),
            ("upload_sessions_max", self.upload_sessions_max as u64),
            ("uploads_streaming_max", self.uploads_streaming_max as u64),
            ("upload_expiry_secs", self.upload_expiry_secs),
            (
                "downloads_streaming_max",
                self.downloads_streaming_max as u64,
            ),
            ("connections_max", self.connections_max as u64),
            ("list_page_max", self.list_page_max as u64),
            ("request_head_timeout_secs", self.request_head_timeout_secs),
            ("scrub_bytes_per_sec_max", self.scrub_bytes_per_sec_max),
            (
                "write_inline_from_writers",
                self.write_inline_from_writers as u64,
            ),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        // Both are semaphores' permits, held one per connection.
        if self.connections_max > CONNECTIONS_MAX_LIMIT {
            return Err(ConfigError::Invalid(format!(
                "connections_max is at most {CONNECTIONS_MAX_LIMIT}"
            )));
        }
        if self.large_read_connections_max > self.connections_max {
            return Err(ConfigError::Invalid(
                "large_read_connections_max is at most connections_max".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.compact_live_fraction_max) {
            return Err(ConfigError::Invalid(
                "compact_live_fraction_max is between 0 and 1".into(),
            ));
        }
        if self.gc_interval_secs > 0 && self.gc_grace_secs == 0 {
            return Err(ConfigError::Invalid(
                "gc_grace_secs must be at least 1 while online collection runs: it covers the gap between an upload's commit and its link".into(),
            ));
        }
        for (name, v) in [
            ("gc_interval_secs", self.gc_interval_secs),
            ("scrub_interval_secs", self.scrub_interval_secs),
        ] {
            if v > 10 * 365 * 86_400 {
                return Err(ConfigError::Invalid(format!(
                    "{name} is at most ten years (0 turns it off)"
                )));
            }
        }
        if self.manifest_bytes_max > 64 << 20 {
            return Err(ConfigError::Invalid(
                "manifest_bytes_max is held in memory: at most 64 MiB".into(),
            ));
        }
        // The engine's settings (segment_bytes) are checked by the engine,
        // on the configuration the server would open the store with.
        crate::serve::store_config(self)
            .validate()
            .map_err(|e| match e {
                orlop_engine::Error::Config(m) => ConfigError::Invalid(m),
                e => ConfigError::Invalid(e.to_string()),
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_override_defaults() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = dir.path().join("orlop.toml");
        std::fs::write(
            &f,
            "addr = \"0.0.0.0:6000\"\nupload_expiry_secs = 60\ndata = \"/srv/orlop\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let env = vec![
            ("ORLOP_UPLOAD_EXPIRY_SECS".to_string(), "5".to_string()),
            ("ORLOP_LOG".to_string(), "debug".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let c = ServerConfig::load(Some(&f), env).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.addr.port(), 6000);
        assert_eq!(c.upload_expiry_secs, 5);
        assert_eq!(c.data, PathBuf::from("/srv/orlop"));
        assert_eq!(c.manifest_bytes_max, 4 << 20);
    }

    #[test]
    fn bad_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = dir.path().join("orlop.toml");
        std::fs::write(&f, "no_such_setting = 1\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            ServerConfig::load(Some(&f), vec![]),
            Err(ConfigError::Parse { .. })
        ));
        let env = vec![("ORLOP_LIST_PAGE_MAX".to_string(), "many".to_string())];
        assert!(matches!(
            ServerConfig::load(None, env),
            Err(ConfigError::Env { .. })
        ));
        let env = vec![("ORLOP_UPLOAD_SESSIONS_MAX".to_string(), "0".to_string())];
        assert!(matches!(
            ServerConfig::load(None, env),
            Err(ConfigError::Invalid(_))
        ));
        for (var, value) in [
            ("ORLOP_CONNECTIONS_MAX", "18446744073709551615"),
            ("ORLOP_LARGE_READ_CONNECTIONS_MAX", "1025"),
        ] {
            let env = vec![(var.to_string(), value.to_string())];
            assert!(
                matches!(ServerConfig::load(None, env), Err(ConfigError::Invalid(_))),
                "{var}={value}"
            );
        }
        let env = vec![(
            "ORLOP_LARGE_READ_CONNECTIONS_MAX".to_string(),
            "0".to_string(),
        )];
        let cfg = ServerConfig::load(None, env).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.large_read_connections_max, 0);
    }

    #[test]
    fn segment_bytes_reaches_the_engine_within_its_bounds() {
        let load = |v: &str| {
            ServerConfig::load(
                None,
                vec![("ORLOP_SEGMENT_BYTES".to_string(), v.to_string())],
            )
        };
        // The default is the engine's.
        let c = ServerConfig::load(None, vec![]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.segment_bytes, StoreConfig::new("").segment_bytes);
        assert_eq!(c.segment_bytes, 256 << 20);
        // An override reaches the store's configuration.
        let c = load("2097152").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.segment_bytes, 2 << 20);
        assert_eq!(crate::serve::store_config(&c).segment_bytes, 2 << 20);
        // The engine's bounds: 4 x (largest chunk + 1 KiB) ..= u32::MAX.
        let min = 4 * (orlop_engine::ChunkParams::default().max_bytes as u64 + 1024);
        assert!(load(&min.to_string()).is_ok());
        for bad in [0, min - 1, u32::MAX as u64 + 1] {
            match load(&bad.to_string()) {
                Err(ConfigError::Invalid(m)) => assert!(m.contains("segment_bytes"), "{m}"),
                other => panic!("segment_bytes {bad} accepted: {other:?}"),
            }
        }
        assert!(load(&(u32::MAX as u64).to_string()).is_ok());
        assert!(matches!(load("2MiB"), Err(ConfigError::Env { .. })));
        // And from a file.
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = dir.path().join("orlop.toml");
        std::fs::write(&f, "segment_bytes = 4194304\n").unwrap_or_else(|e| panic!("{e}"));
        let c = ServerConfig::load(Some(&f), vec![]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.segment_bytes, 4 << 20);
    }
}
