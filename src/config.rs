//! The standalone config file of `paynotify serve`: listeners, limits and routes whose keys
//! come from files, environment variables or inline values.

use crate::delivery::jetstream::NatsSettings;
use crate::spec::{GoDuration, KeyMaterial, RouteSpec};
use crate::table::{CompileError, ResolvedRoute, TableDocument};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a key comes from in the config file: exactly one field is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySource {
    /// A file, relative to the config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// An environment variable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// The value itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Server settings of the config file.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// Where platforms post notifications.
    pub listen: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub admin_listen: SocketAddr,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// Longest a request may take end to end, body read included.
    pub request_timeout: Duration,
    /// Most notifications remembered for deduplication.
    pub dedup_max_entries: usize,
    /// How long a delivered notification is remembered (at least 25h).
    pub dedup_retention: Duration,
    /// The embedded store of Queued routes.
    pub store: StoreSettings,
    /// Whether `POST /replay` is served on the admin listener.
    pub admin_replay: bool,
}

/// The embedded store (used once a route is Queued).
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSettings {
    /// The SQLite file (relative paths are relative to the config file).
    pub path: PathBuf,
    /// The store refuses new events beyond this size (the platform then retries).
    pub max_size_bytes: u64,
    /// Dead letters are kept this long.
    pub dead_letter_retention: Duration,
    /// NATS JetStream instead of the file, for several ingress replicas.
    pub nats: Option<crate::delivery::jetstream::NatsSettings>,
}

/// The platforms retry for about 25 hours; dedup must outlive that.
pub const MIN_DEDUP_RETENTION: Duration = Duration::from_secs(25 * 3600);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    listen: SocketAddr,
    #[serde(default = "default_admin")]
    admin_listen: SocketAddr,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default = "default_request_timeout")]
    request_timeout: GoDuration,
    #[serde(default)]
    dedup: RawDedup,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    admin: RawAdmin,
    routes: Vec<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawStore {
    #[serde(default = "default_store_path")]
    path: PathBuf,
    #[serde(default = "default_store_size")]
    max_size_bytes: u64,
    #[serde(default = "default_dead_letter_retention")]
    dead_letter_retention: GoDuration,
    #[serde(default)]
    nats: Option<RawNats>,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            path: default_store_path(),
            max_size_bytes: default_store_size(),
            dead_letter_retention: default_dead_letter_retention(),
            nats: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawNats {
    url: String,
    credentials_file: Option<PathBuf>,
    stream: Option<String>,
    replicas: Option<usize>,
    dedup_window: Option<GoDuration>,
    retention: Option<GoDuration>,
    publish_timeout: Option<GoDuration>,
}

impl RawNats {
    fn settings(self, base: &Path, dead_letter_retention: Duration) -> NatsSettings {
        let mut s = NatsSettings::new(self.url);
        s.credentials_file = self.credentials_file.map(|p| base.join(p));
        s.stream = self.stream.unwrap_or(s.stream);
        s.replicas = self.replicas.unwrap_or(s.replicas);
        s.dedup_window = self.dedup_window.map_or(s.dedup_window, |d| d.0);
        s.retention = self.retention.map_or(s.retention, |d| d.0);
        s.publish_timeout = self.publish_timeout.map_or(s.publish_timeout, |d| d.0);
        s.dead_letter_retention = dead_letter_retention;
        s
    }
}

fn default_store_path() -> PathBuf {
    PathBuf::from("paynotify-queue.db")
}
fn default_store_size() -> u64 {
    1 << 30
}
fn default_dead_letter_retention() -> GoDuration {
    GoDuration(Duration::from_secs(7 * 86400))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAdmin {
    #[serde(default)]
    replay: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDedup {
    #[serde(default = "default_dedup_entries")]
    max_entries: usize,
    #[serde(default = "default_dedup_retention")]
    retention: GoDuration,
}

impl Default for RawDedup {
    fn default() -> Self {
        RawDedup {
            max_entries: default_dedup_entries(),
            retention: default_dedup_retention(),
        }
    }
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_max_body() -> usize {
    256 * 1024
}
fn default_request_timeout() -> GoDuration {
    GoDuration(Duration::from_secs(10))
}
fn default_dedup_entries() -> usize {
    500_000
}
fn default_dedup_retention() -> GoDuration {
    GoDuration(MIN_DEDUP_RETENTION)
}

/// Why a config file was refused; each line names the route and field where it applies.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// One or more problems in the content.
    #[error("{path}:\n  {}", .problems.join("\n  "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<String>,
    },
}

/// A loaded config: server settings and the resolved routing document.
#[derive(Debug)]
pub struct LoadedConfig {
    /// Listener and limit settings.
    pub server: ServerSettings,
    /// Routes with their keys read.
    pub document: TableDocument,
}

/// Reads and validates the file at `path`, resolving every key source. The document's
/// generation is 0; the server numbers its loads.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base, &|name| std::env::var(name).ok()).map_err(|problems| ConfigError::Invalid {
        path: path.into(),
        problems,
    })
}

/// Parses config text; file key sources are relative to `base`, env ones read with `env`.
pub fn parse(
    text: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<LoadedConfig, Vec<String>> {
    let de = serde_yaml::Deserializer::from_str(text);
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| vec![describe(&e)])?;
    let mut problems = Vec::new();
    if raw.max_body_bytes < 1024 || raw.max_body_bytes > 16 * 1024 * 1024 {
        problems.push("maxBodyBytes: must be between 1024 and 16777216".to_string());
    }
    let request_timeout = raw.request_timeout.0;
    if request_timeout < Duration::from_secs(1) || request_timeout > Duration::from_secs(120) {
        problems.push("requestTimeout: must be between 1s and 2m".to_string());
    }
    if raw.dedup.retention.0 < MIN_DEDUP_RETENTION {
        problems.push(
            "dedup.retention: must be at least 25h (the platforms retry for about 25 hours)"
                .to_string(),
        );
    }
    if raw.dedup.max_entries < 1000 {
        problems.push("dedup.maxEntries: must be at least 1000".to_string());
    }
    if raw.store.max_size_bytes < 1 << 20 {
        problems.push("store.maxSizeBytes: must be at least 1048576".to_string());
    }
    let nats = raw
        .store
        .nats
        .map(|n| n.settings(base, raw.store.dead_letter_retention.0));
    if let Some(n) = &nats {
        problems.extend(n.problems());
    }
    if raw.listen == raw.admin_listen {
        problems.push("adminListen: must differ from listen".to_string());
    }
    let mut routes = Vec::new();
    for (i, value) in raw.routes.into_iter().enumerate() {
        match parse_route(i, value, base, env) {
            Ok(r) => routes.push(r),
            Err(mut p) => problems.append(&mut p),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(LoadedConfig {
        server: ServerSettings {
            listen: raw.listen,
            admin_listen: raw.admin_listen,
            max_body_bytes: raw.max_body_bytes,
            request_timeout,
            dedup_max_entries: raw.dedup.max_entries,
            dedup_retention: raw.dedup.retention.0,
            store: StoreSettings {
                path: base.join(&raw.store.path),
                max_size_bytes: raw.store.max_size_bytes,
                dead_letter_retention: raw.store.dead_letter_retention.0,
                nats,
            },
            admin_replay: raw.admin.replay,
        },
        document: TableDocument {
            generation: 0,
            routes,
        },
    })
}

fn describe<E: std::fmt::Display>(e: &serde_path_to_error::Error<E>) -> String {
    let path = e.path().to_string();
    if path == "." {
        e.inner().to_string()
    } else {
        format!("{path}: {}", e.inner())
    }
}

fn parse_route(
    index: usize,
    mut value: serde_yaml::Value,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ResolvedRoute, Vec<String>> {
    let name = value
        .as_mapping_mut()
        .and_then(|m| m.remove("name"))
        .and_then(|n| n.as_str().map(str::to_string))
        .ok_or_else(|| vec![format!("routes[{index}]: every route needs a name")])?;
    let spec: RouteSpec<KeySource> = serde_path_to_error::deserialize(value)
        .map_err(|e| vec![format!("route {name:?}: {}", describe(&e))])?;
    let mut problems = Vec::new();
    let resolved = spec.map_keys(|field, source| match resolve(source, base, env) {
        Ok(bytes) => KeyMaterial(bytes),
        Err(m) => {
            problems.push(
                CompileError {
                    route: name.clone(),
                    field: field.into(),
                    message: m,
                }
                .to_string(),
            );
            KeyMaterial(Vec::new())
        }
    });
    if problems.is_empty() {
        Ok(ResolvedRoute {
            name,
            spec: resolved,
        })
    } else {
        Err(problems)
    }
}

fn resolve(
    source: &KeySource,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<u8>, String> {
    match (&source.file, &source.env, &source.value) {
        (Some(file), None, None) => {
            let path = base.join(file);
            std::fs::read(&path)
                .map_err(|e| format!("cannot read key file {}: {e}", path.display()))
        }
        (None, Some(name), None) => env(name)
            .map(String::into_bytes)
            .ok_or_else(|| format!("environment variable {name} is not set")),
        (None, None, Some(v)) => Ok(v.clone().into_bytes()),
        _ => Err("give exactly one of file, env or value".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn errors_name_route_and_field() {
        let text = r#"
listen: 127.0.0.1:8080
routes:
  - name: a
    path: /a
    provider:
      alipay: {appId: "1", signType: RSA3, publicKey: {value: x}}
    targets: [{log: {}}]
    signing: {secret: {value: s}}
  - name: b
    path: /b
    provider:
      wechatPayV2: {appId: wx, mchId: "1", signType: MD5, apiKey: {env: NOPE}}
    targets: [{log: {}}]
    signing: {secret: {file: missing.txt}}
"#;
        let problems = parse(text, Path::new("/nonexistent"), &no_env).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0]
                .starts_with("route \"a\": provider.alipay.signType: unknown variant `RSA3`"),
            "{}",
            problems[0]
        );
        assert!(problems[1].contains(
            "route \"b\": provider.wechatPayV2.apiKey: environment variable NOPE is not set"
        ));
        assert!(problems[2].contains("route \"b\": signing.secret: cannot read key file"));
    }

    #[test]
    fn the_nats_store_is_read_with_defaults_and_checked() {
        let ok = parse(
            "listen: 127.0.0.1:8080\nstore:\n  nats: {url: nats://n:4222, credentialsFile: a.creds, replicas: 3}\nroutes: []\n",
            Path::new("/etc/paynotify"),
            &no_env,
        )
        .unwrap();
        let nats = ok.server.store.nats.unwrap();
        assert_eq!(nats.url, "nats://n:4222");
        assert_eq!(nats.replicas, 3);
        assert_eq!(nats.stream, "PAYNOTIFY");
        assert_eq!(nats.dedup_window, MIN_DEDUP_RETENTION);
        assert_eq!(
            nats.credentials_file.as_deref(),
            Some(Path::new("/etc/paynotify/a.creds"))
        );
        let bad = parse(
            "listen: 127.0.0.1:8080\nstore:\n  nats: {url: nats://n, dedupWindow: 1h, stream: a.b}\nroutes: []\n",
            Path::new("."),
            &no_env,
        )
        .unwrap_err();
        assert!(
            bad.iter().any(|p| p.starts_with("store.nats.dedupWindow")),
            "{bad:?}"
        );
        assert!(
            bad.iter().any(|p| p.starts_with("store.nats.stream")),
            "{bad:?}"
        );
    }

    #[test]
    fn defaults_and_limits() {
        let ok = parse(
            "listen: 127.0.0.1:8080\nroutes: []\n",
            Path::new("."),
            &no_env,
        )
        .unwrap();
        assert_eq!(ok.server.max_body_bytes, 262144);
        assert_eq!(ok.server.dedup_retention, MIN_DEDUP_RETENTION);
        let bad = parse(
            "listen: 127.0.0.1:8080\nmaxBodyBytes: 10\ndedup: {retention: 1h}\nroutes: []\n",
            Path::new("."),
            &no_env,
        )
        .unwrap_err();
        assert_eq!(bad.len(), 2);
        let unknown = parse(
            "listen: 127.0.0.1:8080\nlisten2: x\nroutes: []\n",
            Path::new("."),
            &no_env,
        )
        .unwrap_err();
        assert!(
            unknown[0].contains("unknown field `listen2`"),
            "{unknown:?}"
        );
    }
}
