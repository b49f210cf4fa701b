//! The route specification shared by the standalone config file and the
//! `PaymentNotifyRoute` custom resource. Only the key type `K` differs: a file, env or
//! value source in the config file, a Secret reference in the cluster, and resolved bytes
//! in the compiled table.

use crate::provider::alipay::AlipaySignType;
use crate::provider::wechatpay_v2::WechatV2SignType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One route: a callback path, the platform and keys that verify it, and where verified
/// events go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec<K> {
    /// The callback URL path the platform is given, e.g. `/notify/shop/alipay`.
    pub path: String,
    /// Exactly one platform.
    pub provider: ProviderSpec<K>,
    /// Where verified events are delivered (at least one).
    pub targets: Vec<TargetSpec>,
    /// How events are delivered.
    #[serde(default)]
    pub delivery: DeliverySpec,
    /// How deliveries are signed.
    pub signing: SigningSpec<K>,
}

/// The platform of a route: exactly one field is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProviderSpec<K> {
    /// Alipay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alipay: Option<AlipaySpec<K>>,
    /// WeChat Pay API v2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wechat_pay_v2: Option<WechatPayV2Spec<K>>,
    /// WeChat Pay APIv3.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wechat_pay_v3: Option<WechatPayV3Spec<K>>,
}

/// Alipay settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AlipaySpec<K> {
    /// The app's `app_id`; notifications for any other app are refused.
    pub app_id: String,
    /// `RSA2` (SHA256withRSA) or `RSA` (SHA1withRSA).
    pub sign_type: AlipaySignType,
    /// The Alipay public key (base64 SPKI, PEM SPKI, PEM PKCS#1) or public-key certificate.
    pub public_key: K,
    /// Alipay's root certificate bundle, to show `alipay_root_cert_sn` (certificate mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_certificate: Option<K>,
}

/// WeChat Pay API v2 settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WechatPayV2Spec<K> {
    /// The `appid` notifications must carry.
    pub app_id: String,
    /// The `mch_id` notifications must carry.
    pub mch_id: String,
    /// `MD5` or `HMAC-SHA256`.
    pub sign_type: WechatV2SignType,
    /// The 32-character API key.
    pub api_key: K,
}

/// WeChat Pay APIv3 settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WechatPayV3Spec<K> {
    /// The `mchid` (or `sp_mchid`) decrypted resources must carry.
    pub mch_id: String,
    /// If set, the `appid` (or `sp_appid`) decrypted resources must carry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// The 32-character APIv3 key.
    pub api_v3_key: K,
    /// Platform certificates, several at once during rotation.
    #[serde(default = "Vec::<K>::new", skip_serializing_if = "Vec::is_empty")]
    pub platform_certificates: Vec<K>,
    /// The WeChat Pay public key and its `PUB_KEY_ID_…` id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKeySpec<K>>,
    /// Allowed distance between `Wechatpay-Timestamp` and now (default `5m`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_clock_skew: Option<GoDuration>,
}

/// A WeChat Pay public key with its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PublicKeySpec<K> {
    /// `PUB_KEY_ID_…`, as shown in the merchant platform.
    pub id: String,
    /// The public key (PEM).
    pub key: K,
}

/// A delivery target: exactly one field is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetSpec {
    /// An http(s) URL that receives the event as a signed POST.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A Service in the route's own namespace (cluster only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceTarget>,
    /// The built-in target that writes each event to the log (for demos and debugging).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<LogTarget>,
}

/// A Service that receives events, in the route's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceTarget {
    /// The Service's name.
    pub name: String,
    /// Its port.
    pub port: u16,
    /// The HTTP path (default `/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Settings of the built-in log target (none yet).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogTarget {}

/// How a route delivers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeliverySpec {
    /// `Synchronous` (ack the platform after every target answered 2xx) or `Queued`.
    #[serde(default)]
    pub mode: DeliveryMode,
    /// Per-attempt timeout toward each target (default `3s`).
    #[serde(default = "default_timeout")]
    pub timeout: GoDuration,
    /// Queued mode: when to retry a failed delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
}

impl Default for DeliverySpec {
    fn default() -> Self {
        DeliverySpec {
            mode: DeliveryMode::default(),
            timeout: default_timeout(),
            retry: None,
        }
    }
}

/// The retry schedule of Queued delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Wait before each retry; after the last one the event is a dead letter
    /// (default 15s, 30s, 1m, 3m, 10m, 30m, 1h, 3h, 6h, 12h). Each wait varies by ±10%.
    pub schedule: Vec<GoDuration>,
}

/// The default retry schedule: about 23 hours, like the platforms' own.
pub fn default_retry_schedule() -> Vec<Duration> {
    [
        15,
        30,
        60,
        180,
        600,
        1800,
        3600,
        3 * 3600,
        6 * 3600,
        12 * 3600,
    ]
    .map(Duration::from_secs)
    .to_vec()
}

fn default_timeout() -> GoDuration {
    GoDuration(Duration::from_secs(3))
}

/// Delivery modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum DeliveryMode {
    /// Forward, then answer the platform: its retries are the queue.
    #[default]
    Synchronous,
    /// Store durably, answer at once, deliver with retries.
    Queued,
}

/// How deliveries are signed (Standard Webhooks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SigningSpec<K> {
    /// The `whsec_<base64>` secret.
    pub secret: K,
}

/// A duration written the Go and Kubernetes way: `500ms`, `3s`, `5m`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    /// Parses `([0-9]+(\.[0-9]+)?(ms|s|m|h))+`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a duration like 500ms, 3s, 5m or 1h30m");
        if text.is_empty() {
            return Err(bad());
        }
        let mut total = 0f64;
        let mut rest = text;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            let (num, tail) = rest.split_at(num_len);
            if num.is_empty()
                || num.starts_with('.')
                || num.ends_with('.')
                || num.matches('.').count() > 1
            {
                return Err(bad());
            }
            let value: f64 = num.parse().map_err(|_| bad())?;
            let (unit, after) = if let Some(t) = tail.strip_prefix("ms") {
                (0.001, t)
            } else if let Some(t) = tail.strip_prefix('s') {
                (1.0, t)
            } else if let Some(t) = tail.strip_prefix('m') {
                (60.0, t)
            } else if let Some(t) = tail.strip_prefix('h') {
                (3600.0, t)
            } else {
                return Err(bad());
            };
            total += value * unit;
            rest = after;
        }
        if !total.is_finite() || total > 366.0 * 86400.0 {
            return Err(bad());
        }
        Ok(GoDuration(Duration::from_secs_f64(total)))
    }
}

impl std::fmt::Display for GoDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else {
            let s = ms / 1000;
            match (s / 3600, s % 3600 / 60, s % 60) {
                (0, 0, s) => write!(f, "{s}s"),
                (h, m, s) => {
                    if h > 0 {
                        write!(f, "{h}h")?;
                    }
                    if m > 0 {
                        write!(f, "{m}m")?;
                    }
                    if s > 0 {
                        write!(f, "{s}s")?;
                    }
                    Ok(())
                }
            }
        }
    }
}

impl JsonSchema for GoDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration such as 500ms, 3s, 5m or 1h30m."
        })
    }
}

impl Serialize for GoDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        GoDuration::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Resolved key material, carried as standard base64 in the compiled table.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyMaterial(pub Vec<u8>);

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyMaterial({} bytes)", self.0.len())
    }
}

impl Serialize for KeyMaterial {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::crypto::base64_encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for KeyMaterial {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        crate::crypto::base64_decode(text.as_bytes())
            .map(KeyMaterial)
            .ok_or_else(|| serde::de::Error::custom("key material is not base64"))
    }
}

impl<K> RouteSpec<K> {
    /// Maps every key reference through `f`, which also gets the reference's field path.
    pub fn map_keys<L>(&self, mut f: impl FnMut(&str, &K) -> L) -> RouteSpec<L> {
        let provider = ProviderSpec {
            alipay: self.provider.alipay.as_ref().map(|a| AlipaySpec {
                app_id: a.app_id.clone(),
                sign_type: a.sign_type,
                public_key: f("provider.alipay.publicKey", &a.public_key),
                root_certificate: a
                    .root_certificate
                    .as_ref()
                    .map(|r| f("provider.alipay.rootCertificate", r)),
            }),
            wechat_pay_v2: self
                .provider
                .wechat_pay_v2
                .as_ref()
                .map(|w| WechatPayV2Spec {
                    app_id: w.app_id.clone(),
                    mch_id: w.mch_id.clone(),
                    sign_type: w.sign_type,
                    api_key: f("provider.wechatPayV2.apiKey", &w.api_key),
                }),
            wechat_pay_v3: self
                .provider
                .wechat_pay_v3
                .as_ref()
                .map(|w| WechatPayV3Spec {
                    mch_id: w.mch_id.clone(),
                    app_id: w.app_id.clone(),
                    api_v3_key: f("provider.wechatPayV3.apiV3Key", &w.api_v3_key),
                    platform_certificates: w
                        .platform_certificates
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            f(
                                &format!("provider.wechatPayV3.platformCertificates[{i}]"),
                                c,
                            )
                        })
                        .collect(),
                    public_key: w.public_key.as_ref().map(|p| PublicKeySpec {
                        id: p.id.clone(),
                        key: f("provider.wechatPayV3.publicKey.key", &p.key),
                    }),
                    max_clock_skew: w.max_clock_skew,
                }),
        };
        RouteSpec {
            path: self.path.clone(),
            provider,
            targets: self.targets.clone(),
            delivery: self.delivery.clone(),
            signing: SigningSpec {
                secret: f("signing.secret", &self.signing.secret),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(GoDuration::parse("3s").unwrap().0, Duration::from_secs(3));
        assert_eq!(
            GoDuration::parse("500ms").unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            GoDuration::parse("1h30m").unwrap().0,
            Duration::from_secs(5400)
        );
        assert_eq!(
            GoDuration::parse("1.5s").unwrap().0,
            Duration::from_millis(1500)
        );
        for bad in [
            "",
            "3",
            "s",
            "3x",
            "-3s",
            "3 s",
            ".5s",
            "5.s",
            "1.2.3s",
            "99999999h",
        ] {
            assert!(GoDuration::parse(bad).is_err(), "{bad}");
        }
        for text in ["3s", "500ms", "5m", "1h30m", "25h"] {
            assert_eq!(GoDuration::parse(text).unwrap().to_string(), text);
        }
    }
}
