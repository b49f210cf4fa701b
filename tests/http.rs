//! HTTP-level tests: the real router, a real downstream server on loopback.

mod support;

use paynotify::ingress::server::run_listener;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use support::{Downstream, TestKey, WEBHOOK_SECRET};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Every third-party fixture through the router: accepts are delivered exactly once with a
/// valid Standard Webhooks signature and answered in the platform's success format; rejects
/// get the platform's failure format and nothing is delivered.
#[tokio::test]
async fn fixtures_through_the_router() {
    let downstream = Downstream::start().await;
    for case in support::cases() {
        let table = support::table_for(
            &case.route,
            "/notify",
            json!([{"url": downstream.url}]),
            &support::fixtures_dir(),
        );
        let ingress = support::ingress(table, case.now, TIMEOUT);
        let (status, body) = support::send(
            &ingress.router(),
            "/notify",
            &case.headers,
            case.body.clone(),
        )
        .await;
        let delivered = downstream.take();
        if case.accepts() {
            assert_eq!(delivered.len(), 1, "{}: one delivery", case.name);
            let event = support::check_webhook(&delivered[0], WEBHOOK_SECRET);
            assert_eq!(event["type"], case.expect["eventType"], "{}", case.name);
            for (field, got) in [
                ("orderId", &event["orderId"]),
                ("amount", &event["amount"]["value"]),
            ] {
                if !case.expect[field].is_null() {
                    assert_eq!(got, &case.expect[field], "{}: {field}", case.name);
                }
            }
            assert_eq!(event["route"], "test-route");
            assert_eq!(event["provider"], case.provider.as_str());
            match case.provider.as_str() {
                "alipay" => assert_eq!((status, body.as_str()), (200, "success"), "{}", case.name),
                "wechatpay-v2" => assert_eq!(
                    (status, body.as_str()),
                    (
                        200,
                        "<xml><return_code><![CDATA[SUCCESS]]></return_code><return_msg><![CDATA[OK]]></return_msg></xml>"
                    ),
                    "{}",
                    case.name
                ),
                _ => assert_eq!((status, body.as_str()), (204, ""), "{}", case.name),
            }
        } else {
            assert!(delivered.is_empty(), "{}: nothing delivered", case.name);
            let reason = case.reason().unwrap();
            assert_eq!(status, 400, "{}", case.name);
            match case.provider.as_str() {
                "alipay" => assert_eq!(body, "fail", "{}", case.name),
                "wechatpay-v2" => assert_eq!(
                    body,
                    format!(
                        "<xml><return_code><![CDATA[FAIL]]></return_code><return_msg><![CDATA[{reason}]]></return_msg></xml>"
                    ),
                    "{}",
                    case.name
                ),
                _ => assert_eq!(
                    serde_json::from_str::<Value>(&body).unwrap(),
                    json!({"code": "FAIL", "message": reason}),
                    "{}",
                    case.name
                ),
            }
            let metrics = ingress.metrics.render();
            let series = format!(
                "paynotify_notifications_total{{outcome=\"rejected_{reason}\",provider=\"{}\",route=\"test-route\"}} 1",
                case.provider
            );
            assert!(metrics.contains(&series), "{}: metric {series}", case.name);
        }
    }
}

fn alipay_setup(key: &TestKey, url: &str) -> paynotify::table::RoutingTable {
    support::table_for(
        &json!({"alipay": {"appId": "2021000000000001", "signType": "RSA2", "publicKey": {"value": key.spki_pem().unwrap()}}}),
        "/a",
        json!([{"url": url}]),
        &support::fixtures_dir(),
    )
}

#[tokio::test]
async fn resent_notification_is_delivered_once() {
    let key = support::test_key();
    let downstream = Downstream::start().await;
    let ingress = support::ingress(alipay_setup(&key, &downstream.url), 1_800_000_000, TIMEOUT);
    let body = support::alipay_payment(&key, "2021000000000001", "1001");
    let headers = http::HeaderMap::new();
    for _ in 0..3 {
        assert_eq!(
            support::send(&ingress.router(), "/a", &headers, body.clone()).await,
            (200, "success".into())
        );
    }
    let delivered = downstream.take();
    assert_eq!(delivered.len(), 1);
    let event = support::check_webhook(&delivered[0], WEBHOOK_SECRET);
    assert_eq!(
        event["amount"],
        json!({"value": 1234, "original": "12.34", "currency": "CNY"})
    );
    assert_eq!(event["orderId"], "1001");
    let m = ingress.metrics.render();
    assert!(m.contains("paynotify_notifications_total{outcome=\"accepted\",provider=\"alipay\",route=\"test-route\"} 1"));
    assert!(m.contains("paynotify_notifications_total{outcome=\"duplicate\",provider=\"alipay\",route=\"test-route\"} 2"));
}

#[tokio::test]
async fn concurrent_copies_are_delivered_once() {
    let key = support::test_key();
    let downstream = Downstream::start().await;
    downstream.set_delay(Duration::from_millis(200));
    let ingress = support::ingress(alipay_setup(&key, &downstream.url), 1_800_000_000, TIMEOUT);
    let body = support::alipay_payment(&key, "2021000000000001", "1002");
    let router = ingress.router();
    let sends = (0..5).map(|_| {
        let (router, body) = (router.clone(), body.clone());
        async move { support::send(&router, "/a", &http::HeaderMap::new(), body).await }
    });
    for answer in futures_util::future::join_all(sends).await {
        assert_eq!(answer, (200, "success".into()));
    }
    assert_eq!(downstream.count(), 1);
}

#[tokio::test]
async fn downstream_down_slow_or_failing_gets_the_failure_answer() {
    let key = support::test_key();
    let headers = http::HeaderMap::new();
    // Down: nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/events", closed.local_addr().unwrap());
    drop(closed);
    let ingress = support::ingress(alipay_setup(&key, &url), 1_800_000_000, TIMEOUT);
    let body = support::alipay_payment(&key, "2021000000000001", "2001");
    assert_eq!(
        support::send(&ingress.router(), "/a", &headers, body).await,
        (503, "fail".into())
    );

    // Slow: answers after the route's 1s timeout.
    let downstream = Downstream::start().await;
    downstream.set_delay(Duration::from_millis(1500));
    let ingress = support::ingress(alipay_setup(&key, &downstream.url), 1_800_000_000, TIMEOUT);
    let body = support::alipay_payment(&key, "2021000000000001", "2002");
    assert_eq!(
        support::send(&ingress.router(), "/a", &headers, body.clone()).await,
        (503, "fail".into())
    );
    assert!(
        ingress
            .metrics
            .render()
            .contains("paynotify_deliveries_total{outcome=\"timeout\"")
    );

    // Failing, then recovered: the platform's retry is delivered (failures are not remembered).
    downstream.set_delay(Duration::ZERO);
    downstream.set_status(500);
    assert_eq!(
        support::send(&ingress.router(), "/a", &headers, body.clone()).await,
        (503, "fail".into())
    );
    downstream.set_status(200);
    assert_eq!(
        support::send(&ingress.router(), "/a", &headers, body).await,
        (200, "success".into())
    );
    let m = ingress.metrics.render();
    assert!(m.contains("paynotify_notifications_total{outcome=\"delivery_failed\",provider=\"alipay\",route=\"test-route\"} 2"), "{m}");
    assert!(m.contains("paynotify_notifications_total{outcome=\"accepted\",provider=\"alipay\",route=\"test-route\"} 1"));
}

#[tokio::test]
async fn every_target_must_accept() {
    let key = support::test_key();
    let good = Downstream::start().await;
    let bad = Downstream::start().await;
    bad.set_status(409);
    let table = support::table_for(
        &json!({"alipay": {"appId": "2021000000000001", "signType": "RSA2", "publicKey": {"value": key.spki_pem().unwrap()}}}),
        "/a",
        json!([{"url": good.url}, {"url": bad.url}]),
        &support::fixtures_dir(),
    );
    let ingress = support::ingress(table, 1_800_000_000, TIMEOUT);
    let body = support::alipay_payment(&key, "2021000000000001", "3001");
    assert_eq!(
        support::send(&ingress.router(), "/a", &http::HeaderMap::new(), body).await,
        (503, "fail".into())
    );
    assert_eq!((good.count(), bad.count()), (1, 1));
}

#[tokio::test]
async fn oversize_unknown_path_and_wrong_method() {
    let key = support::test_key();
    let downstream = Downstream::start().await;
    let ingress = support::ingress(alipay_setup(&key, &downstream.url), 1_800_000_000, TIMEOUT);
    let router = ingress.router();
    let big = vec![b'a'; 256 * 1024 + 1];
    assert_eq!(
        support::send(&router, "/a", &http::HeaderMap::new(), big).await,
        (413, "fail".into())
    );
    assert_eq!(
        support::send(&router, "/nope", &http::HeaderMap::new(), b"x".to_vec())
            .await
            .0,
        404
    );
    use tower::ServiceExt;
    let get = http::Request::get("/a")
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(router.clone().oneshot(get).await.unwrap().status(), 400);
    assert_eq!(downstream.count(), 0);
    let m = ingress.metrics.render();
    assert!(
        m.contains("outcome=\"rejected_oversize\",provider=\"alipay\",route=\"test-route\"} 1")
    );
    assert!(m.contains("paynotify_unrouted_requests_total 1"));
}

#[tokio::test]
async fn wechat_v3_end_to_end_with_platform_certificate() {
    let key = support::test_key();
    let cert = key.certificate(&[0x5A, 0x01, 0x02]).unwrap();
    let downstream = Downstream::start().await;
    let api_v3_key = *b"0123456789abcdef0123456789abcdef";
    let table = support::table_for(
        &json!({"wechatPayV3": {"mchId": "1900000001", "apiV3Key": {"value": std::str::from_utf8(&api_v3_key).unwrap()},
                "platformCertificates": [{"value": cert}]}}),
        "/v3",
        json!([{"url": downstream.url}]),
        &support::fixtures_dir(),
    );
    let now = 1_800_000_000;
    let ingress = support::ingress(table, now, TIMEOUT);
    let (headers, body) = support::wechat_v3_request(
        &key,
        "5A0102",
        &api_v3_key,
        &support::v3_transaction("1900000001", "O-1"),
        "TRANSACTION.SUCCESS",
        now - 10,
    );
    assert_eq!(
        support::send(&ingress.router(), "/v3", &headers, body).await,
        (204, String::new())
    );
    let delivered = downstream.take();
    let event = support::check_webhook(&delivered[0], WEBHOOK_SECRET);
    assert_eq!(event["type"], "payment.succeeded");
    assert_eq!(event["data"]["resource"]["payer"]["openid"], "o-bench");
    assert!(
        event["data"]["notification"]["resource"]
            .get("ciphertext")
            .is_none()
    );
    // The certificate's expiry is exported for the expiry alert (notAfter 2040-01-01).
    let metrics = ingress.metrics.render();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("paynotify_certificate_not_after_timestamp_seconds{")
                && l.contains("serial=\"5A0102\"")
        })
        .unwrap_or_else(|| panic!("no certificate expiry metric in:\n{metrics}"));
    let not_after: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(not_after, 2_208_988_800, "{line}");
}

/// A WeChat Pay certificate rotation through reloads: while requests signed with the old
/// and then the new platform key flow continuously over TCP, the table is swapped from
/// {old} to {old, new} to {new}. No request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rotates_keys_without_a_failed_request() {
    let old = support::test_key();
    let new = support::test_key();
    let (old_cert, new_cert) = (
        old.certificate(&[0x01]).unwrap(),
        new.certificate(&[0x02]).unwrap(),
    );
    let api_v3_key = *b"0123456789abcdef0123456789abcdef";
    let downstream = Downstream::start().await;
    let table = |certs: Vec<&String>, generation: u64| {
        let mut t = support::table_for(
            &json!({"wechatPayV3": {"mchId": "1900000001", "apiV3Key": {"value": std::str::from_utf8(&api_v3_key).unwrap()},
                    "platformCertificates": certs.iter().map(|c| json!({"value": c})).collect::<Vec<_>>()}}),
            "/v3",
            json!([{"url": downstream.url}]),
            &support::fixtures_dir(),
        );
        t.generation = generation;
        t
    };
    let now = 1_800_000_000;
    let ingress = support::ingress(table(vec![&old_cert], 1), now, TIMEOUT);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(run_listener(listener, ingress.router(), stop_rx));

    // Which key the "platform" signs with: switched only once both are installed.
    let use_new = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::new();
    let mut senders = Vec::new();
    let keys = Arc::new((old, new));
    for worker in 0..4 {
        let (use_new, running, sent, client, keys) = (
            use_new.clone(),
            running.clone(),
            sent.clone(),
            client.clone(),
            keys.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut i = 0;
            while running.load(Ordering::SeqCst) {
                let (key, serial) = if use_new.load(Ordering::SeqCst) {
                    (&keys.1, "02")
                } else {
                    (&keys.0, "01")
                };
                let order = format!("W{worker}-{i}");
                let (headers, body) = support::wechat_v3_request(
                    key,
                    serial,
                    &api_v3_key,
                    &support::v3_transaction("1900000001", &order),
                    "TRANSACTION.SUCCESS",
                    now,
                );
                let resp = client
                    .post(format!("http://{addr}/v3"))
                    .headers(headers)
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 204, "request {order} failed during rotation");
                sent.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        }));
    }
    let wait_for = |n: usize| {
        let sent = sent.clone();
        async move {
            while sent.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for(20).await;
    ingress.install(table(vec![&old_cert, &new_cert], 2));
    wait_for(40).await;
    use_new.store(true, Ordering::SeqCst);
    wait_for(60).await;
    // Requests already signed with the old key may still be in flight: let them land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    ingress.install(table(vec![&new_cert], 3));
    wait_for(90).await;
    running.store(false, Ordering::SeqCst);
    for s in senders {
        s.await.unwrap();
    }
    let total = sent.load(Ordering::SeqCst);
    assert_eq!(downstream.count(), total);
    assert!(
        ingress
            .metrics
            .render()
            .contains("paynotify_table_generation 3")
    );
    let _ = stop_tx.send(true);
    server.await.unwrap();
}

/// On shutdown the listener stops accepting, and a request already in flight still gets
/// its answer before the server returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_requests_in_flight() {
    let key = support::test_key();
    let downstream = Downstream::start().await;
    downstream.set_delay(Duration::from_millis(600));
    let ingress = support::ingress(alipay_setup(&key, &downstream.url), 1_800_000_000, TIMEOUT);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(run_listener(listener, ingress.router(), stop_rx));
    let body = support::alipay_payment(&key, "2021000000000001", "4001");
    let in_flight = tokio::spawn(async move {
        let resp = reqwest::Client::new()
            .post(format!("http://{addr}/a"))
            .body(body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    ingress.start_draining();
    stop_tx.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections after shutdown"
    );
    assert_eq!(in_flight.await.unwrap(), (200, "success".to_string()));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(downstream.count(), 1);
    assert!(!ingress.is_ready());
}
