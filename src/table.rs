//! The compiled routing table: the versioned document of resolved routes (what the
//! controller publishes and what `serve` builds from its file) and the pure step that turns
//! it into ready-to-serve routes.

use crate::event::WebhookSecret;
use crate::provider::Adapter;
use crate::provider::alipay::Alipay;
use crate::provider::wechatpay_v2::WechatPayV2;
use crate::provider::wechatpay_v3::{DEFAULT_MAX_CLOCK_SKEW_SECS, WechatPayV3};
use crate::spec::{DeliveryMode, KeyMaterial, RouteSpec};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A route whose key references are resolved to bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResolvedRoute {
    /// The route's name (`namespace/name` in a cluster).
    pub name: String,
    /// The spec with key material inline.
    pub spec: RouteSpec<KeyMaterial>,
}

/// The versioned document the ingress serves from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TableDocument {
    /// Increases with every published change.
    pub generation: u64,
    /// Every route.
    pub routes: Vec<ResolvedRoute>,
}

/// One problem in one route's field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {route:?}: {field}: {message}")]
pub struct CompileError {
    /// The route's name.
    pub route: String,
    /// The field path, e.g. `provider.alipay.publicKey`.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// Every problem found while compiling, so a user fixes them in one pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct CompileErrors(pub Vec<CompileError>);

/// Where a route delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// POST to this URL.
    Url(reqwest::Url),
    /// Write the event to the log.
    Log,
}

impl Target {
    /// The bounded metric label for this target.
    pub fn label(&self) -> &str {
        match self {
            Target::Url(u) => u.as_str(),
            Target::Log => "log",
        }
    }
}

/// A route ready to serve.
#[derive(Debug)]
pub struct Route {
    /// The route's name.
    pub name: String,
    /// Its callback path.
    pub path: String,
    /// The platform adapter with parsed keys.
    pub adapter: Adapter,
    /// Delivery targets.
    pub targets: Vec<Target>,
    /// Per-target timeout.
    pub timeout: Duration,
    /// Synchronous or Queued.
    pub mode: DeliveryMode,
    /// Queued mode: waits before each retry.
    pub retry_schedule: Vec<Duration>,
    /// Standard Webhooks secret.
    pub signing: WebhookSecret,
}

/// Routes by exact path, and the generation they came from.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// The document's generation.
    pub generation: u64,
    routes: HashMap<String, Arc<Route>>,
    by_name: HashMap<String, Arc<Route>>,
}

impl RoutingTable {
    /// The route serving `path`.
    pub fn get(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.get(path)
    }

    /// The route named `name`.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Route>> {
        self.by_name.get(name)
    }

    /// Every route.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.values()
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when no route is configured.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// Shortest and longest per-target timeout accepted.
const TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(60));

/// Compiles a document: validates every route and parses every key. Pure.
pub fn compile(doc: &TableDocument) -> Result<RoutingTable, CompileErrors> {
    let mut errors = Vec::new();
    let mut routes: HashMap<String, Arc<Route>> = HashMap::new();
    let mut names: HashMap<&str, ()> = HashMap::new();
    for resolved in &doc.routes {
        let mut err = |field: &str, message: String| {
            errors.push(CompileError {
                route: resolved.name.clone(),
                field: field.into(),
                message,
            })
        };
        if resolved.name.is_empty() {
            err("name", "a route needs a name".into());
        } else if names.insert(&resolved.name, ()).is_some() {
            err("name", "another route has the same name".into());
        }
        match compile_route(resolved) {
            Ok(route) => {
                if let Some(other) = routes.get(&route.path) {
                    err(
                        "path",
                        format!("{} is already served by route {:?}", route.path, other.name),
                    );
                } else {
                    routes.insert(route.path.clone(), Arc::new(route));
                }
            }
            Err(found) => errors.extend(found),
        }
    }
    if errors.is_empty() {
        let by_name = routes
            .values()
            .map(|r| (r.name.clone(), r.clone()))
            .collect();
        Ok(RoutingTable {
            generation: doc.generation,
            routes,
            by_name,
        })
    } else {
        Err(CompileErrors(errors))
    }
}

/// Compiles one route, reporting every problem it has.
pub fn compile_route(resolved: &ResolvedRoute) -> Result<Route, Vec<CompileError>> {
    let spec = &resolved.spec;
    let mut errors = Vec::new();
    let mut err = |field: &str, message: String| {
        errors.push(CompileError {
            route: resolved.name.clone(),
            field: field.into(),
            message,
        })
    };
    if let Err(m) = validate_path(&spec.path) {
        err("path", m);
    }
    let adapter = compile_provider(spec, &mut err);
    let mut targets = Vec::new();
    if spec.targets.is_empty() {
        err("targets", "at least one target is required".into());
    }
    for (i, t) in spec.targets.iter().enumerate() {
        let field = format!("targets[{i}]");
        match (&t.url, &t.service, &t.log) {
            (Some(url), None, None) => match validate_url(url) {
                Ok(u) => targets.push(Target::Url(u)),
                Err(m) => err(&format!("{field}.url"), m),
            },
            (None, None, Some(_)) => targets.push(Target::Log),
            // The controller turns Service targets into cluster URLs before compiling.
            (None, Some(_), None) => err(
                &format!("{field}.service"),
                "service targets need the cluster controller; give a url here".into(),
            ),
            _ => err(&field, "give exactly one of url, service or log".into()),
        }
    }
    let retry_schedule: Vec<Duration> = match &spec.delivery.retry {
        Some(r) => r.schedule.iter().map(|d| d.0).collect(),
        None => crate::spec::default_retry_schedule(),
    };
    if retry_schedule.len() > 32
        || retry_schedule
            .iter()
            .any(|d| d.is_zero() || *d > Duration::from_secs(7 * 86400))
    {
        err(
            "delivery.retry.schedule",
            "give at most 32 waits, each between 1ms and 7 days".into(),
        );
    }
    let timeout = spec.delivery.timeout.0;
    if timeout < TIMEOUT_RANGE.0 || timeout > TIMEOUT_RANGE.1 {
        err(
            "delivery.timeout",
            format!(
                "must be between 100ms and 60s, got {}",
                spec.delivery.timeout
            ),
        );
    }
    let signing = WebhookSecret::parse(&spec.signing.secret.0)
        .map_err(|m| err("signing.secret", m))
        .ok();
    match (adapter, signing, errors.is_empty()) {
        (Some(adapter), Some(signing), true) => Ok(Route {
            name: resolved.name.clone(),
            path: spec.path.clone(),
            adapter,
            targets,
            timeout,
            mode: spec.delivery.mode,
            retry_schedule,
            signing,
        }),
        _ => Err(errors),
    }
}

fn compile_provider(
    spec: &RouteSpec<KeyMaterial>,
    err: &mut impl FnMut(&str, String),
) -> Option<Adapter> {
    let p = &spec.provider;
    let count = [
        p.alipay.is_some(),
        p.wechat_pay_v2.is_some(),
        p.wechat_pay_v3.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if count != 1 {
        err(
            "provider",
            "give exactly one of alipay, wechatPayV2, wechatPayV3".into(),
        );
        return None;
    }
    if let Some(a) = &p.alipay {
        nonempty(&a.app_id, "provider.alipay.appId", err);
        return Alipay::new(
            Some(a.app_id.clone()),
            a.sign_type,
            &a.public_key.0,
            a.root_certificate.as_ref().map(|r| r.0.as_slice()),
        )
        .map(Adapter::Alipay)
        .map_err(|e| err("provider.alipay.publicKey", e.to_string()))
        .ok();
    }
    if let Some(w) = &p.wechat_pay_v2 {
        nonempty(&w.app_id, "provider.wechatPayV2.appId", err);
        nonempty(&w.mch_id, "provider.wechatPayV2.mchId", err);
        return WechatPayV2::new(
            Some(w.app_id.clone()),
            Some(w.mch_id.clone()),
            w.sign_type,
            &w.api_key.0,
        )
        .map(Adapter::WechatPayV2)
        .map_err(|e| err("provider.wechatPayV2.apiKey", e.to_string()))
        .ok();
    }
    let w = p.wechat_pay_v3.as_ref()?;
    nonempty(&w.mch_id, "provider.wechatPayV3.mchId", err);
    let skew = w
        .max_clock_skew
        .map(|d| d.0.as_secs() as i64)
        .unwrap_or(DEFAULT_MAX_CLOCK_SKEW_SECS);
    if !(1..=3600).contains(&skew) {
        err(
            "provider.wechatPayV3.maxClockSkew",
            "must be between 1s and 1h".into(),
        );
    }
    let certs: Vec<Vec<u8>> = w
        .platform_certificates
        .iter()
        .map(|c| c.0.clone())
        .collect();
    WechatPayV3::new(
        Some(w.mch_id.clone()),
        w.app_id.clone(),
        &w.api_v3_key.0,
        &certs,
        w.public_key
            .as_ref()
            .map(|p| (p.id.as_str(), p.key.0.as_slice())),
        skew,
    )
    .map(Adapter::WechatPayV3)
    .map_err(|e| err("provider.wechatPayV3", e.to_string()))
    .ok()
}

fn nonempty(value: &str, field: &str, err: &mut impl FnMut(&str, String)) {
    if value.trim().is_empty() {
        err(field, "must not be empty".into());
    }
}

/// A callback path: absolute, no query or fragment, no `..`, no whitespace.
pub fn validate_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with /"));
    }
    if path.len() > 512 {
        return Err("longer than 512 characters".into());
    }
    if path.contains(['?', '#']) {
        return Err(format!(
            "{path:?} must not carry a query or fragment (the platforms refuse notify URLs with parameters)"
        ));
    }
    if path.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(format!("{path:?} must not contain . or .. segments"));
    }
    if path
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'%')
    {
        return Err(format!(
            "{path:?} must not contain whitespace, control characters or %-escapes"
        ));
    }
    Ok(())
}

fn validate_url(url: &str) -> Result<reqwest::Url, String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err(format!("{url:?} must be http or https"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert!(validate_path("/notify/shop/alipay").is_ok());
        for bad in [
            "notify", "/a?b=1", "/a#x", "/a/../b", "/a b", "/a%2e", "/./a",
        ] {
            assert!(validate_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls() {
        assert!(validate_url("http://127.0.0.1:9000/payments").is_ok());
        assert!(validate_url("ftp://x/y").is_err());
        assert!(validate_url("not a url").is_err());
    }
}
