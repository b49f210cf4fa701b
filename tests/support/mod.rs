//! Helpers shared by the integration tests: the third-party fixture cases, a test signer,
//! an in-process ingress and a recording downstream server.
#![allow(dead_code)]

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, KeyPair, RsaKeyPair};
use paynotify::delivery::Forwarder;
use paynotify::delivery::dedup::Dedup;
use paynotify::ingress::{Ingress, Limits};
use paynotify::table::{self, RoutingTable};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A demo Standard Webhooks secret for tests.
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// One committed fixture case (see tests/fixtures/FORMAT.md).
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub provider: String,
    pub signed_by: String,
    pub route: Value,
    pub now: i64,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    pub expect: Value,
}

impl Case {
    /// Runs the case through its route's adapter; on success, the event it would deliver.
    pub fn run(&self) -> Result<Value, paynotify::provider::Rejection> {
        let table = table_for(&self.route, "/n", json!([{"log": {}}]), &fixtures_dir());
        let route = table.get("/n").unwrap();
        let incoming = paynotify::provider::Incoming {
            headers: &self.headers,
            body: &self.body,
            now: self.now,
        };
        let verified = route.adapter.authenticate(&incoming)?;
        let event = paynotify::event::PaymentEvent::new(
            "shop/route",
            route.adapter.kind(),
            verified,
            self.now,
        );
        Ok(serde_json::to_value(event).unwrap())
    }

    pub fn accepts(&self) -> bool {
        self.expect["accept"].as_bool().unwrap()
    }
    pub fn reason(&self) -> Option<&str> {
        self.expect["reason"].as_str()
    }
}

pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for provider in ["alipay", "wechatpay-v2", "wechatpay-v3"] {
        let dir = fixtures_dir().join("cases").join(provider);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "json"))
        {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            let headers = header_map(&v["request"]["headers"]);
            let body = match (
                v["request"]["body"].as_str(),
                v["request"]["bodyBase64"].as_str(),
            ) {
                (Some(b), None) => b.as_bytes().to_vec(),
                (None, Some(b)) => paynotify::crypto::base64_decode(b.as_bytes()).unwrap(),
                _ => panic!(
                    "{}: request needs exactly one of body or bodyBase64",
                    file.display()
                ),
            };
            out.push(Case {
                name: v["name"].as_str().unwrap().to_string(),
                provider: v["provider"].as_str().unwrap().to_string(),
                signed_by: v["signedBy"].as_str().unwrap_or_default().to_string(),
                route: v["route"].clone(),
                now: v["now"].as_i64().unwrap(),
                headers,
                body,
                expect: v["expect"].clone(),
            });
        }
    }
    assert!(out.len() > 40, "fixture cases are missing");
    out
}

/// A header map from a JSON object of strings.
pub fn header_map(object: &Value) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    for (k, val) in object.as_object().unwrap() {
        headers.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            val.as_str().unwrap().parse().unwrap(),
        );
    }
    headers
}

/// Compiles a table with one route at `path`, using the case's provider block.
pub fn table_for(provider: &Value, path: &str, targets: Value, base: &Path) -> RoutingTable {
    let config = json!({
        "listen": "127.0.0.1:1",
        "routes": [{
            "name": "test-route",
            "path": path,
            "provider": provider,
            "targets": targets,
            "delivery": {"mode": "Synchronous", "timeout": "1s"},
            "signing": {"secret": {"value": WEBHOOK_SECRET}},
        }]
    });
    let loaded = paynotify::config::parse(&config.to_string(), base, &|_| None)
        .unwrap_or_else(|e| panic!("{e:?}"));
    table::compile(&loaded.document).unwrap_or_else(|e| panic!("{e}"))
}

/// An ingress with a fixed clock.
pub fn ingress(table: RoutingTable, now: i64, request_timeout: Duration) -> Arc<Ingress> {
    let ingress = Ingress::new(
        Limits {
            max_body_bytes: 256 * 1024,
            request_timeout,
        },
        Dedup::new(Duration::from_secs(25 * 3600), 10_000),
        Forwarder::new().unwrap(),
        Arc::new(move || now),
    );
    ingress.install(table);
    ingress
}

/// A request the downstream received.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

/// A downstream HTTP server on loopback that records requests and answers as told.
pub struct Downstream {
    pub url: String,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub status: Arc<Mutex<u16>>,
    pub delay: Arc<Mutex<Duration>>,
}

impl Downstream {
    pub async fn start() -> Downstream {
        let received = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(204u16));
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let (r, s, d) = (received.clone(), status.clone(), delay.clone());
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (r, s, d) = (r.clone(), s.clone(), d.clone());
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap()
                    .to_vec();
                let wait = *d.lock().unwrap();
                tokio::time::sleep(wait).await;
                r.lock().unwrap().push(Received {
                    headers: parts.headers,
                    body,
                });
                http::StatusCode::from_u16(*s.lock().unwrap()).unwrap()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Downstream {
            url: format!("http://{addr}/events"),
            received,
            status,
            delay,
        }
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn take(&self) -> Vec<Received> {
        std::mem::take(&mut *self.received.lock().unwrap())
    }
}

/// Checks the Standard Webhooks headers of a delivery and returns the event.
pub fn check_webhook(received: &Received, secret: &str) -> Value {
    let h = |n: &str| {
        received
            .headers
            .get(n)
            .unwrap_or_else(|| panic!("no {n}"))
            .to_str()
            .unwrap()
            .to_string()
    };
    let id = h("webhook-id");
    let ts: i64 = h("webhook-timestamp").parse().unwrap();
    let secret = paynotify::event::WebhookSecret::parse(secret.as_bytes()).unwrap();
    assert!(
        secret.verify(&id, ts, &received.body, &h("webhook-signature")),
        "webhook signature must verify"
    );
    assert_eq!(h("content-type"), "application/json");
    let event: Value = serde_json::from_slice(&received.body).unwrap();
    assert_eq!(event["id"], id.as_str());
    event
}

/// Sends one request through the router in process.
pub async fn send(
    router: &axum::Router,
    path: &str,
    headers: &http::HeaderMap,
    body: Vec<u8>,
) -> (u16, String) {
    use tower::ServiceExt;
    let mut req = http::Request::post(path)
        .body(axum::body::Body::from(body))
        .unwrap();
    *req.headers_mut() = headers.clone();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An RSA-2048 key that signs like a platform (our own signer, for dynamic tests).
pub struct TestKey {
    pair: RsaKeyPair,
    pkcs8: Vec<u8>,
}

impl TestKey {
    pub fn generate() -> TestKey {
        let pair = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair)
            .unwrap()
            .as_ref()
            .to_vec();
        TestKey { pair, pkcs8 }
    }

    pub fn spki_pem(&self) -> String {
        let spki = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(
            self.pair.public_key(),
        )
        .unwrap();
        let b64 = paynotify::crypto::base64_encode(spki.as_ref());
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    pub fn sign_sha256(&self, message: &[u8]) -> String {
        let mut sig = vec![0u8; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                message,
                &mut sig,
            )
            .unwrap();
        paynotify::crypto::base64_encode(&sig)
    }

    /// A self-signed certificate for this key with the given serial, PEM.
    pub fn certificate(&self, serial: &[u8]) -> String {
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &self.pkcs8.clone().into(),
            &rcgen::PKCS_RSA_SHA256,
        )
        .unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Tenpay.com sign");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2040, 1, 1);
        params.self_signed(&key).unwrap().pem()
    }
}

/// A signed Alipay notification body (RSA2) for `params`.
pub fn alipay_body(key: &TestKey, params: &[(&str, &str)]) -> Vec<u8> {
    let mut sorted: Vec<_> = params.to_vec();
    sorted.sort();
    let content: String = sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let sig = key.sign_sha256(content.as_bytes());
    let mut form: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", form_escape(v)))
        .collect();
    form.push(format!("sign={}", form_escape(&sig)));
    form.push("sign_type=RSA2".into());
    form.join("&").into_bytes()
}

fn form_escape(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                (b as char).to_string()
            }
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A typical Alipay payment notification for order `order`.
pub fn alipay_payment(key: &TestKey, app_id: &str, order: &str) -> Vec<u8> {
    let trade = format!("2026120322001{order}");
    alipay_body(
        key,
        &[
            ("app_id", app_id),
            ("charset", "utf-8"),
            ("notify_id", &format!("n-{order}")),
            ("notify_type", "trade_status_sync"),
            ("out_trade_no", order),
            ("trade_no", &trade),
            ("trade_status", "TRADE_SUCCESS"),
            ("total_amount", "12.34"),
            ("gmt_payment", "2026-12-03 12:00:05"),
            ("version", "1.0"),
        ],
    )
}

/// A signed and encrypted WeChat Pay APIv3 notification: headers and body.
pub fn wechat_v3_request(
    key: &TestKey,
    serial: &str,
    api_v3_key: &[u8; 32],
    resource: &Value,
    event_type: &str,
    ts: i64,
) -> (http::HeaderMap, Vec<u8>) {
    use aws_lc_rs::aead;
    let nonce = b"nonce0123456";
    let sealing =
        aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, api_v3_key).unwrap());
    let mut data = serde_json::to_vec(resource).unwrap();
    sealing
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(*nonce),
            aead::Aad::from(b"transaction"),
            &mut data,
        )
        .unwrap();
    let body = serde_json::to_vec(&json!({
        "id": format!("EV-{ts}"),
        "create_time": "2026-12-03T12:00:06+08:00",
        "resource_type": "encrypt-resource",
        "event_type": event_type,
        "summary": "test",
        "resource": {
            "original_type": "transaction",
            "algorithm": "AEAD_AES_256_GCM",
            "ciphertext": paynotify::crypto::base64_encode(&data),
            "associated_data": "transaction",
            "nonce": std::str::from_utf8(nonce).unwrap(),
        }
    }))
    .unwrap();
    let nonce_header = "c4682f0902e4c7fd5cfb7568a2a45e1b";
    let mut message = format!("{ts}\n{nonce_header}\n").into_bytes();
    message.extend_from_slice(&body);
    message.push(b'\n');
    let mut headers = http::HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert("wechatpay-timestamp", ts.to_string().parse().unwrap());
    headers.insert("wechatpay-nonce", nonce_header.parse().unwrap());
    headers.insert("wechatpay-serial", serial.parse().unwrap());
    headers.insert(
        "wechatpay-signature-type",
        "WECHATPAY2-SHA256-RSA2048".parse().unwrap(),
    );
    headers.insert(
        "wechatpay-signature",
        key.sign_sha256(&message).parse().unwrap(),
    );
    (headers, body)
}

/// A WeChat Pay APIv3 TRANSACTION.SUCCESS resource.
pub fn v3_transaction(mch_id: &str, order: &str) -> Value {
    json!({
        "mchid": mch_id, "appid": "wx0000000000000001", "out_trade_no": order,
        "transaction_id": format!("42000000{order}"), "trade_type": "JSAPI", "trade_state": "SUCCESS",
        "trade_state_desc": "ok", "bank_type": "OTHERS", "attach": "", "success_time": "2026-12-03T12:00:05+08:00",
        "payer": {"openid": "o-test"}, "amount": {"total": 100, "payer_total": 100, "currency": "CNY", "payer_currency": "CNY"}
    })
}
