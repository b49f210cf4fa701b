//! The pure heart of the controller: one route, the Secrets it names and every other route
//! in, one evaluation out — the resolved route for the table (when it can serve) and the
//! facts its status reports. No client and no clock: the caller fetched the Secrets.

use crate::crd::{KeyStatus, PaymentNotifyRoute, SecretKeySource};
use crate::provider::Adapter;
use crate::spec::{KeyMaterial, RouteSpec, TargetSpec};
use crate::table::{self, ResolvedRoute};
use std::collections::BTreeMap;

/// A Secret's data, by Secret name, as fetched from the route's namespace (`None`: absent).
pub type SecretData = BTreeMap<String, Option<BTreeMap<String, Vec<u8>>>>;

/// One condition to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionFact {
    /// `Ready`, `KeysResolved` or `PathAccepted`.
    pub type_: &'static str,
    /// True or false.
    pub ok: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// What to do about it.
    pub message: String,
}

/// What the controller found about one route.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// `namespace/name`: the route's name in the table, metrics and events.
    pub key: String,
    /// The route to publish, if it can serve.
    pub resolved: Option<ResolvedRoute>,
    /// Ready, KeysResolved, PathAccepted.
    pub conditions: Vec<ConditionFact>,
    /// The platform.
    pub provider: Option<&'static str>,
    /// Key fingerprints and certificate facts.
    pub keys: Vec<KeyStatus>,
}

impl Evaluation {
    /// True when the route serves.
    pub fn ready(&self) -> bool {
        self.resolved.is_some()
    }

    /// The condition of `type_`.
    pub fn condition(&self, type_: &str) -> Option<&ConditionFact> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// Settings that shape resolution.
#[derive(Debug, Clone)]
pub struct Environment {
    /// The cluster's DNS domain, for Service targets (`cluster.local`).
    pub cluster_domain: String,
}

/// The route's `namespace/name`.
pub fn route_key(route: &PaymentNotifyRoute) -> String {
    format!(
        "{}/{}",
        route.metadata.namespace.as_deref().unwrap_or_default(),
        route.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Which route owns `path`: the oldest by creation time, then by `namespace/name`.
pub fn path_owner<'a>(
    path: &str,
    routes: &'a [&'a PaymentNotifyRoute],
) -> Option<&'a PaymentNotifyRoute> {
    routes
        .iter()
        .copied()
        .filter(|r| r.spec.path == path && r.metadata.deletion_timestamp.is_none())
        .min_by(|a, b| {
            let created =
                |r: &PaymentNotifyRoute| r.metadata.creation_timestamp.as_ref().map(|t| t.0);
            created(a)
                .cmp(&created(b))
                .then_with(|| route_key(a).cmp(&route_key(b)))
        })
}

/// Every Secret name the route refers to.
pub fn referenced_secrets(spec: &RouteSpec<SecretKeySource>) -> Vec<String> {
    let mut names = Vec::new();
    let _ = spec.map_keys(|_, source| {
        if !names.contains(&source.secret_key_ref.name) {
            names.push(source.secret_key_ref.name.clone());
        }
    });
    names
}

fn fact(
    type_: &'static str,
    ok: bool,
    reason: &'static str,
    message: impl Into<String>,
) -> ConditionFact {
    ConditionFact {
        type_,
        ok,
        reason,
        message: message.into(),
    }
}

/// Evaluates `route` against the Secrets of its namespace and all routes.
pub fn evaluate(
    route: &PaymentNotifyRoute,
    secrets: &SecretData,
    all_routes: &[&PaymentNotifyRoute],
    env: &Environment,
) -> Evaluation {
    let key = route_key(route);
    let namespace = route.metadata.namespace.clone().unwrap_or_default();

    // Dereference: every key from a Secret of the route's own namespace.
    let mut missing = Vec::new();
    let resolved_spec = route.spec.map_keys(|field, source| {
        let sel = &source.secret_key_ref;
        match secrets.get(&sel.name) {
            Some(Some(data)) => match data.get(&sel.key) {
                Some(bytes) => KeyMaterial(bytes.clone()),
                None => {
                    missing.push((
                        "KeyNotFound",
                        format!(
                            "{field}: Secret {namespace}/{} has no key {:?}",
                            sel.name, sel.key
                        ),
                    ));
                    KeyMaterial(Vec::new())
                }
            },
            _ => {
                missing.push((
                    "SecretNotFound",
                    format!("{field}: Secret {namespace}/{} not found", sel.name),
                ));
                KeyMaterial(Vec::new())
            }
        }
    });

    // Targets: Service references become cluster DNS URLs in the route's namespace.
    let targets: Vec<TargetSpec> = resolved_spec
        .targets
        .iter()
        .map(|t| match &t.service {
            Some(svc) => TargetSpec {
                url: Some(format!(
                    "http://{}.{namespace}.svc.{}:{}{}",
                    svc.name,
                    env.cluster_domain,
                    svc.port,
                    svc.path.as_deref().unwrap_or("/")
                )),
                service: None,
                log: None,
            },
            None => t.clone(),
        })
        .collect();
    let resolved = ResolvedRoute {
        name: key.clone(),
        spec: RouteSpec {
            targets,
            ..resolved_spec
        },
    };

    let provider = [
        route.spec.provider.alipay.as_ref().map(|_| "alipay"),
        route
            .spec
            .provider
            .wechat_pay_v2
            .as_ref()
            .map(|_| "wechatpay-v2"),
        route
            .spec
            .provider
            .wechat_pay_v3
            .as_ref()
            .map(|_| "wechatpay-v3"),
    ]
    .into_iter()
    .flatten()
    .next();

    // Validate and build: the same compile step the ingress runs.
    let compiled = missing.is_empty().then(|| table::compile_route(&resolved));
    let (mut key_problems, mut target_problems, mut path_problems, mut spec_problems) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    if let Some(Err(errors)) = &compiled {
        for e in errors {
            let line = format!("{}: {}", e.field, e.message);
            match e.field.split(['.', '[']).next().unwrap_or_default() {
                "provider" | "signing" => key_problems.push(line),
                "targets" => target_problems.push(line),
                "path" => path_problems.push(line),
                _ => spec_problems.push(line),
            }
        }
    }
    let keys_fact = if let Some((reason, _)) = missing.first() {
        let messages: Vec<&str> = missing.iter().map(|(_, m)| m.as_str()).collect();
        fact("KeysResolved", false, reason, messages.join("; "))
    } else if !key_problems.is_empty() {
        fact("KeysResolved", false, "KeyInvalid", key_problems.join("; "))
    } else {
        fact(
            "KeysResolved",
            true,
            "KeysValid",
            "every key was found and parsed",
        )
    };

    // Path: the oldest route keeps it.
    let path_fact = match path_owner(&route.spec.path, all_routes) {
        _ if !path_problems.is_empty() => fact(
            "PathAccepted",
            false,
            "PathInvalid",
            path_problems.join("; "),
        ),
        Some(owner) if route_key(owner) != key => fact(
            "PathAccepted",
            false,
            "PathConflict",
            format!(
                "path {} is served by the older route {}; choose another path",
                route.spec.path,
                route_key(owner)
            ),
        ),
        _ => fact(
            "PathAccepted",
            true,
            "PathAccepted",
            format!("serving {}", route.spec.path),
        ),
    };

    let keys = match &compiled {
        Some(Ok(route)) => key_facts(&route.adapter),
        _ => Vec::new(),
    };
    let ready = matches!(compiled, Some(Ok(_))) && path_fact.ok;
    let ready_fact = if ready {
        fact("Ready", true, "Ready", "the ingress serves this route")
    } else {
        // The first problem to fix, in the order a user would fix them.
        let (reason, message) = if !keys_fact.ok {
            (keys_fact.reason, keys_fact.message.clone())
        } else if !target_problems.is_empty() {
            ("TargetInvalid", target_problems.join("; "))
        } else if !path_fact.ok {
            (path_fact.reason, path_fact.message.clone())
        } else {
            ("SpecInvalid", spec_problems.join("; "))
        };
        fact("Ready", false, reason, message)
    };
    Evaluation {
        key,
        resolved: ready.then_some(resolved),
        conditions: vec![ready_fact, keys_fact, path_fact],
        provider,
        keys,
    }
}

/// Fingerprints and certificate facts of a compiled adapter's keys.
fn key_facts(adapter: &Adapter) -> Vec<KeyStatus> {
    let rfc3339 = |t: i64| crate::event::rfc3339_utc(t);
    match adapter {
        Adapter::Alipay(a) => {
            let cert = a.key().certificate.as_ref();
            vec![KeyStatus {
                field: "provider.alipay.publicKey".into(),
                fingerprint: a.key().fingerprint(),
                serial: cert.map(|c| c.serial_hex.clone()),
                cert_sn: cert.map(|c| c.alipay_sn.clone()),
                not_after: cert.map(|c| rfc3339(c.not_after)),
            }]
        }
        Adapter::WechatPayV2(w) => vec![KeyStatus {
            field: "provider.wechatPayV2.apiKey".into(),
            fingerprint: w.key_fingerprint(),
            ..Default::default()
        }],
        Adapter::WechatPayV3(w) => {
            let mut keys: Vec<KeyStatus> = w
                .keys()
                .map(|(serial, k)| KeyStatus {
                    field: if k.key.certificate.is_some() {
                        "provider.wechatPayV3.platformCertificates".into()
                    } else {
                        "provider.wechatPayV3.publicKey".into()
                    },
                    fingerprint: k.key.fingerprint(),
                    serial: Some(serial.to_string()),
                    cert_sn: None,
                    not_after: k.key.certificate.as_ref().map(|c| rfc3339(c.not_after)),
                })
                .collect();
            keys.sort_by(|a, b| a.serial.cmp(&b.serial));
            keys
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{SecretKeySelector, SecretKeySource};
    use crate::spec::{AlipaySpec, DeliverySpec, ProviderSpec, ServiceTarget, SigningSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const ALIPAY_KEY: &str = include_str!("../../examples/keys/alipay_public.txt");
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn key(name: &str, key: &str) -> SecretKeySource {
        SecretKeySource {
            secret_key_ref: SecretKeySelector {
                name: name.into(),
                key: key.into(),
            },
        }
    }

    fn route(name: &str, path: &str, created: i64, targets: Vec<TargetSpec>) -> PaymentNotifyRoute {
        let spec = RouteSpec {
            path: path.into(),
            provider: ProviderSpec {
                alipay: Some(AlipaySpec {
                    app_id: "2021000000000001".into(),
                    sign_type: crate::provider::alipay::AlipaySignType::Rsa2,
                    public_key: key("alipay", "public"),
                    root_certificate: None,
                }),
                wechat_pay_v2: None,
                wechat_pay_v3: None,
            },
            targets,
            delivery: DeliverySpec::default(),
            signing: SigningSpec {
                secret: key("webhook", "secret"),
            },
        };
        let mut r = PaymentNotifyRoute::new(name, spec);
        r.metadata.namespace = Some("shop".into());
        r.metadata.uid = Some(format!("uid-{name}"));
        r.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        r
    }

    fn url(u: &str) -> TargetSpec {
        TargetSpec {
            url: Some(u.into()),
            service: None,
            log: None,
        }
    }

    fn secrets(alipay: Option<&str>) -> SecretData {
        let mut s = SecretData::new();
        s.insert(
            "alipay".into(),
            alipay.map(|k| BTreeMap::from([("public".to_string(), k.as_bytes().to_vec())])),
        );
        s.insert(
            "webhook".into(),
            Some(BTreeMap::from([(
                "secret".to_string(),
                SECRET.as_bytes().to_vec(),
            )])),
        );
        s
    }

    fn env() -> Environment {
        Environment {
            cluster_domain: "cluster.local".into(),
        }
    }

    fn cond<'a>(e: &'a Evaluation, t: &str) -> (&'a str, bool) {
        let c = e.condition(t).unwrap();
        (c.reason, c.ok)
    }

    #[test]
    fn a_complete_route_is_ready_with_fingerprints() {
        let r = route(
            "a",
            "/notify/a",
            100,
            vec![url("http://orders.shop:8080/pay")],
        );
        let e = evaluate(&r, &secrets(Some(ALIPAY_KEY)), &[&r], &env());
        assert!(e.ready());
        assert_eq!(cond(&e, "Ready"), ("Ready", true));
        assert_eq!(cond(&e, "KeysResolved"), ("KeysValid", true));
        assert_eq!(cond(&e, "PathAccepted"), ("PathAccepted", true));
        assert_eq!(e.provider, Some("alipay"));
        assert!(e.keys[0].fingerprint.starts_with("SHA256:"));
        let resolved = e.resolved.unwrap();
        assert_eq!(resolved.name, "shop/a");
        assert_eq!(
            resolved.spec.provider.alipay.unwrap().public_key.0,
            ALIPAY_KEY.as_bytes()
        );
    }

    #[test]
    fn missing_secret_key_and_bad_material_are_named() {
        let r = route("a", "/notify/a", 100, vec![url("http://x/")]);
        let e = evaluate(&r, &secrets(None), &[&r], &env());
        assert_eq!(cond(&e, "KeysResolved"), ("SecretNotFound", false));
        assert_eq!(cond(&e, "Ready"), ("SecretNotFound", false));
        assert!(
            e.condition("Ready")
                .unwrap()
                .message
                .contains("Secret shop/alipay not found")
        );
        assert!(e.resolved.is_none());

        let mut s = secrets(Some(ALIPAY_KEY));
        s.insert(
            "alipay".into(),
            Some(BTreeMap::from([("other".to_string(), b"x".to_vec())])),
        );
        let e = evaluate(&r, &s, &[&r], &env());
        assert_eq!(cond(&e, "KeysResolved"), ("KeyNotFound", false));

        let e = evaluate(&r, &secrets(Some("not a key")), &[&r], &env());
        assert_eq!(cond(&e, "KeysResolved"), ("KeyInvalid", false));
        assert!(
            e.condition("KeysResolved")
                .unwrap()
                .message
                .starts_with("provider.alipay.publicKey:")
        );
    }

    #[test]
    fn bad_targets_and_service_targets() {
        let r = route("a", "/notify/a", 100, vec![url("ftp://x/")]);
        let e = evaluate(&r, &secrets(Some(ALIPAY_KEY)), &[&r], &env());
        assert_eq!(cond(&e, "Ready"), ("TargetInvalid", false));
        assert_eq!(cond(&e, "KeysResolved"), ("KeysValid", true));

        let svc = TargetSpec {
            url: None,
            service: Some(ServiceTarget {
                name: "orders".into(),
                port: 8080,
                path: Some("/events".into()),
            }),
            log: None,
        };
        let r = route("a", "/notify/a", 100, vec![svc]);
        let e = evaluate(&r, &secrets(Some(ALIPAY_KEY)), &[&r], &env());
        assert!(e.ready());
        assert_eq!(
            e.resolved.unwrap().spec.targets[0].url.as_deref(),
            Some("http://orders.shop.svc.cluster.local:8080/events")
        );
    }

    #[test]
    fn the_older_route_keeps_the_path() {
        let old = route("zzz-old", "/notify/same", 100, vec![url("http://x/")]);
        let new = route("aaa-new", "/notify/same", 200, vec![url("http://x/")]);
        let all = [&new, &old];
        let s = secrets(Some(ALIPAY_KEY));
        assert!(evaluate(&old, &s, &all, &env()).ready());
        let e = evaluate(&new, &s, &all, &env());
        assert_eq!(cond(&e, "PathAccepted"), ("PathConflict", false));
        assert_eq!(cond(&e, "Ready"), ("PathConflict", false));
        assert!(
            e.condition("Ready")
                .unwrap()
                .message
                .contains("shop/zzz-old")
        );
        // Same creation time: the name decides, so every replica agrees.
        let twin = route("bbb", "/notify/same", 100, vec![url("http://x/")]);
        assert_eq!(
            route_key(path_owner("/notify/same", &[&old, &twin]).unwrap()),
            "shop/bbb"
        );
    }
}
