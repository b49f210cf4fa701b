//! Helpers shared by the integration tests: the third-party fixture cases, a test signer,
//! an in-process ingress and a recording downstream server.
#![allow(dead_code)]

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

/// A request the downstream received, and the status it answered.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    pub status: u16,
    pub at: std::time::Instant,
}

impl Received {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn event(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// How the downstream answers.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub status: u16,
    pub delay: Duration,
    /// Answer 503 to every n-th request (1-based), whatever `status` says.
    pub fail_every: Option<usize>,
    pub retry_after: Option<u64>,
}

/// A downstream HTTP server on loopback that records requests and answers as told.
pub struct Downstream {
    pub url: String,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
}

impl Downstream {
    pub async fn start() -> Downstream {
        let received = Arc::new(Mutex::new(Vec::<Received>::new()));
        let behaviour = Arc::new(Mutex::new(Behaviour {
            status: 204,
            delay: Duration::ZERO,
            fail_every: None,
            retry_after: None,
        }));
        let (r, b) = (received.clone(), behaviour.clone());
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (r, b) = (r.clone(), b.clone());
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap()
                    .to_vec();
                let now = b.lock().unwrap().clone();
                tokio::time::sleep(now.delay).await;
                let mut list = r.lock().unwrap();
                let n = list.len() + 1;
                let status = match now.fail_every {
                    Some(every) if n % every == 0 => 503,
                    _ => now.status,
                };
                list.push(Received {
                    headers: parts.headers,
                    body,
                    status,
                    at: std::time::Instant::now(),
                });
                let mut response = http::Response::builder().status(status);
                if let Some(secs) = now.retry_after {
                    response = response.header("retry-after", secs.to_string());
                }
                response.body(axum::body::Body::empty()).unwrap()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Downstream {
            url: format!("http://{addr}/events"),
            received,
            behaviour,
        }
    }

    pub fn set_status(&self, status: u16) {
        self.behaviour.lock().unwrap().status = status;
    }

    pub fn set_delay(&self, delay: Duration) {
        self.behaviour.lock().unwrap().delay = delay;
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn take(&self) -> Vec<Received> {
        std::mem::take(&mut *self.received.lock().unwrap())
    }

    pub fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
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

/// A platform key for tests.
pub type TestKey = paynotify::signer::PlatformKey;

/// A fresh platform key (test shorthand).
pub fn test_key() -> TestKey {
    TestKey::generate().unwrap()
}

/// A typical Alipay payment notification for order `order`.
pub fn alipay_payment(key: &TestKey, app_id: &str, order: &str) -> Vec<u8> {
    paynotify::signer::alipay_payment(key, app_id, order).unwrap()
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
    let signed =
        paynotify::signer::wechat_v3_request(key, serial, api_v3_key, resource, event_type, ts)
            .unwrap();
    let mut headers = http::HeaderMap::new();
    for (k, v) in signed.headers {
        headers.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    (headers, signed.body)
}

/// A WeChat Pay APIv3 TRANSACTION.SUCCESS resource for `order`.
pub fn v3_transaction(mch_id: &str, order: &str) -> Value {
    paynotify::signer::wechat_v3_transaction(mch_id, order)
}

/// A port that was free a moment ago on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh, empty directory `paynotify-<kind>-<name>-<pid>` under the system temp dir.
pub fn temp_dir(kind: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("paynotify-{kind}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `check` every 20 ms until it yields a value; fails the test after `limit`.
pub async fn wait<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that for each order `<prefix><i>`, `i < orders`, the first successful delivery of
/// its payment came before the first of its refund (`delivered` in arrival order).
pub fn assert_payments_before_refunds(delivered: &[Value], prefix: &str, orders: usize) {
    let mut first_seen: std::collections::HashMap<(String, String), usize> =
        std::collections::HashMap::new();
    for (i, e) in delivered.iter().enumerate() {
        first_seen
            .entry((
                e["orderId"].as_str().unwrap().to_string(),
                e["type"].as_str().unwrap().to_string(),
            ))
            .or_insert(i);
    }
    for i in 0..orders {
        let order = format!("{prefix}{i}");
        let pay = first_seen[&(order.clone(), "payment.succeeded".into())];
        let refund = first_seen[&(order, "refund.succeeded".into())];
        assert!(
            pay < refund,
            "order {prefix}{i}: the refund overtook its payment"
        );
    }
}
