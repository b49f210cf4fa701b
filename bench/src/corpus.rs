//! The keys, server configurations and pre-signed notifications of one benchmark run.
//!
//! Every notification has its own order and transaction id, so neither server can answer
//! from a deduplication cache; each is checked with paynotify's own adapters before use.

use crate::Error;
use paynotify::provider::{Adapter, Incoming};
use paynotify::signer::{self, PlatformKey};
use serde_json::json;
use std::path::Path;

/// The providers measured, by route path.
pub const PROVIDERS: [Provider; 4] = [
    Provider {
        name: "Alipay RSA2",
        path: "/alipay",
    },
    Provider {
        name: "WeChat Pay v2 MD5",
        path: "/wxv2-md5",
    },
    Provider {
        name: "WeChat Pay v2 HMAC-SHA256",
        path: "/wxv2-hmac",
    },
    Provider {
        name: "WeChat Pay v3 (platform certificate)",
        path: "/wxv3",
    },
];

/// One measured provider.
#[derive(Debug, Clone, Copy)]
pub struct Provider {
    /// Human name.
    pub name: &'static str,
    /// Route path on both servers.
    pub path: &'static str,
}

/// One pre-built request.
#[derive(Clone)]
pub struct Notification {
    /// Request headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: bytes::Bytes,
}

const APP_ID: &str = "2021000000000001";
const WX_APP_ID: &str = "wx0000000000000001";
const MCH_ID: &str = "1900000001";
const API_KEY: &str = "BenchApiKeyBenchApiKeyBenchApi01";
const API_V3_KEY: &[u8; 32] = b"BenchApiV3KeyBenchApiV3KeyBench1";
const SERIAL: &str = "5EED0001";
/// A demo Standard Webhooks secret shared by both servers and the sink.
pub const WEBHOOK_SECRET: &str = "whsec_YmVuY2gtc2VjcmV0LWJlbmNoLXNlY3JldC0wMQ==";

/// Keys and the notifications signed with them.
pub struct Corpus {
    alipay_key: PlatformKey,
    v3_cert: String,
    /// Notifications per provider, in `PROVIDERS` order.
    pub notifications: Vec<Vec<Notification>>,
}

impl Corpus {
    /// Makes `count` unique notifications per provider, signing on every core.
    pub fn generate(count: usize, now: i64) -> Result<Self, Error> {
        let alipay_key = PlatformKey::generate()?;
        let v3_key = PlatformKey::generate()?;
        let v3_cert = v3_key.certificate(&[0x5E, 0xED, 0x00, 0x01])?;
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let make = |provider: usize, i: usize| -> Result<Notification, Error> {
            let order = format!("B{provider}{i:09}");
            Ok(match provider {
                0 => Notification {
                    headers: vec![(
                        "content-type".into(),
                        "application/x-www-form-urlencoded; charset=utf-8".into(),
                    )],
                    body: signer::alipay_payment(&alipay_key, APP_ID, &order)?.into(),
                },
                1 | 2 => Notification {
                    headers: vec![("content-type".into(), "text/xml".into())],
                    body: signer::wechat_v2_payment(
                        API_KEY,
                        provider == 2,
                        WX_APP_ID,
                        MCH_ID,
                        &order,
                    )
                    .into(),
                },
                _ => {
                    let resource = signer::wechat_v3_transaction(MCH_ID, &order);
                    let signed = signer::wechat_v3_request(
                        &v3_key,
                        SERIAL,
                        API_V3_KEY,
                        &resource,
                        "TRANSACTION.SUCCESS",
                        now,
                    )?;
                    Notification {
                        headers: signed.headers,
                        body: signed.body.into(),
                    }
                }
            })
        };
        let mut notifications = Vec::new();
        for provider in 0..PROVIDERS.len() {
            let chunks: Result<Vec<Vec<Notification>>, Error> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        s.spawn(move || {
                            (t..count)
                                .step_by(threads)
                                .map(|i| make(provider, i))
                                .collect::<Result<Vec<_>, _>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .map_err(|_| Error::from("signing thread panicked"))?
                    })
                    .collect()
            });
            // Re-interleave so that index i is the i-th notification.
            let chunks = chunks?;
            let mut list = Vec::with_capacity(count);
            for i in 0..count {
                list.push(chunks[i % threads][i / threads].clone());
            }
            notifications.push(list);
        }
        let corpus = Corpus {
            alipay_key,
            v3_cert,
            notifications,
        };
        corpus.check(now)?;
        Ok(corpus)
    }

    /// Verifies every notification with paynotify's adapters, so that a broken corpus can
    /// never pass for a slow server.
    fn check(&self, now: i64) -> Result<(), Error> {
        let adapters = self.adapters()?;
        for (provider, list) in self.notifications.iter().enumerate() {
            for n in list {
                let mut headers = http::HeaderMap::new();
                for (k, v) in &n.headers {
                    headers.insert(http::HeaderName::from_bytes(k.as_bytes())?, v.parse()?);
                }
                adapters[provider]
                    .authenticate(&Incoming {
                        headers: &headers,
                        body: &n.body,
                        now,
                    })
                    .map_err(|e| {
                        format!(
                            "corpus for {} does not verify: {e}",
                            PROVIDERS[provider].name
                        )
                    })?;
            }
        }
        Ok(())
    }

    fn adapters(&self) -> Result<Vec<Adapter>, Error> {
        use paynotify::provider::alipay::{Alipay, AlipaySignType};
        use paynotify::provider::wechatpay_v2::{WechatPayV2, WechatV2SignType};
        use paynotify::provider::wechatpay_v3::WechatPayV3;
        Ok(vec![
            Adapter::Alipay(Alipay::new(
                Some(APP_ID.into()),
                AlipaySignType::Rsa2,
                self.alipay_key.spki_pem()?.as_bytes(),
                None,
            )?),
            Adapter::WechatPayV2(WechatPayV2::new(
                Some(WX_APP_ID.into()),
                Some(MCH_ID.into()),
                WechatV2SignType::Md5,
                API_KEY.as_bytes(),
            )?),
            Adapter::WechatPayV2(WechatPayV2::new(
                Some(WX_APP_ID.into()),
                Some(MCH_ID.into()),
                WechatV2SignType::HmacSha256,
                API_KEY.as_bytes(),
            )?),
            Adapter::WechatPayV3(WechatPayV3::new(
                Some(MCH_ID.into()),
                None,
                API_V3_KEY,
                &[self.v3_cert.clone().into_bytes()],
                None,
                3600,
            )?),
        ])
    }

    /// Writes paynotify's config (keys inline) for a server on `listen`/`admin` that
    /// delivers to `sink`.
    pub fn write_paynotify_config(
        &self,
        path: &Path,
        listen: u16,
        admin: u16,
        sink: &str,
    ) -> Result<(), Error> {
        let route = |name: &str, path: &str, provider: serde_json::Value| {
            json!({"name": name, "path": path, "provider": provider, "targets": [{"url": sink}],
                   "delivery": {"mode": "Synchronous", "timeout": "3s"},
                   "signing": {"secret": {"value": WEBHOOK_SECRET}}})
        };
        let config = json!({
            "listen": format!("127.0.0.1:{listen}"),
            "adminListen": format!("127.0.0.1:{admin}"),
            "routes": [
                route("alipay", "/alipay", json!({"alipay": {"appId": APP_ID, "signType": "RSA2", "publicKey": {"value": self.alipay_key.spki_base64()?}}})),
                route("wxv2-md5", "/wxv2-md5", json!({"wechatPayV2": {"appId": WX_APP_ID, "mchId": MCH_ID, "signType": "MD5", "apiKey": {"value": API_KEY}}})),
                route("wxv2-hmac", "/wxv2-hmac", json!({"wechatPayV2": {"appId": WX_APP_ID, "mchId": MCH_ID, "signType": "HMAC-SHA256", "apiKey": {"value": API_KEY}}})),
                // The corpus is signed before the run; the window covers a long full run.
                route("wxv3", "/wxv3", json!({"wechatPayV3": {"mchId": MCH_ID, "apiV3Key": {"value": String::from_utf8_lossy(API_V3_KEY)},
                    "platformCertificates": [{"value": self.v3_cert}], "maxClockSkew": "1h"}})),
            ]
        });
        // JSON is YAML.
        std::fs::write(path, serde_json::to_vec_pretty(&config)?)?;
        Ok(())
    }

    /// Writes the GoPay peer's config for a server on `listen` that delivers to `sink`.
    pub fn write_peer_config(&self, path: &Path, listen: u16, sink: &str) -> Result<(), Error> {
        let config = json!({
            "listen": format!("127.0.0.1:{listen}"),
            "downstream": sink,
            "webhookSecret": WEBHOOK_SECRET,
            "deliveryTimeoutMs": 3000,
            "routes": {
                "/alipay": {"provider": "alipay", "appId": APP_ID, "publicKey": self.alipay_key.spki_base64()?},
                "/wxv2-md5": {"provider": "wechatpay-v2", "appId": WX_APP_ID, "mchId": MCH_ID, "signType": "MD5", "apiKey": API_KEY},
                "/wxv2-hmac": {"provider": "wechatpay-v2", "appId": WX_APP_ID, "mchId": MCH_ID, "signType": "HMAC-SHA256", "apiKey": API_KEY},
                "/wxv3": {"provider": "wechatpay-v3", "mchId": MCH_ID, "apiV3Key": String::from_utf8_lossy(API_V3_KEY),
                          "platformCertificates": [{"serial": SERIAL, "pem": self.v3_cert}], "maxClockSkewSeconds": 3600},
            }
        });
        std::fs::write(path, serde_json::to_vec_pretty(&config)?)?;
        Ok(())
    }
}

/// True when `status` and `body` are the platform's success answer for `path`.
pub fn is_success(path: &str, status: u16, body: &[u8]) -> bool {
    match path {
        "/alipay" => status == 200 && body == b"success",
        "/wxv3" => status == 204 || status == 200,
        _ => status == 200 && body.windows(19).any(|w| w == b"<![CDATA[SUCCESS]]>"),
    }
}
