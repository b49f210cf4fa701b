//! Queued delivery with the embedded store: ack after a durable write, retries on the
//! configured (compressed) schedule, dead letters and replay, per-order ordering, a full
//! store, and crash safety of the real binary under SIGKILL.

mod support;

use paynotify::delivery::queue::{self, Backend, Queue};
use paynotify::delivery::store::{Selector, Store};
use paynotify::ingress::Ingress;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Downstream, TestKey, WEBHOOK_SECRET, temp_dir, wait};

const APP_ID: &str = "2021000000000001";

/// An in-process ingress with one Queued Alipay route at /q and its dispatcher running.
fn queued_ingress(
    key: &TestKey,
    url: &str,
    schedule: &[&str],
    store: &Path,
    max_bytes: u64,
) -> (Arc<Ingress>, Queue) {
    let provider = json!({"alipay": {"appId": APP_ID, "signType": "RSA2", "publicKey": {"value": key.spki_pem().unwrap()}}});
    let config = json!({
        "listen": "127.0.0.1:1",
        "routes": [{
            "name": "q", "path": "/q", "provider": provider, "targets": [{"url": url}],
            "delivery": {"mode": "Queued", "timeout": "1s", "retry": {"schedule": schedule}},
            "signing": {"secret": {"value": WEBHOOK_SECRET}},
        }]
    });
    let loaded = paynotify::config::parse(&config.to_string(), Path::new("."), &|_| None).unwrap();
    let table = paynotify::table::compile(&loaded.document).unwrap();
    let ingress = support::ingress(table, 1_800_000_000, Duration::from_secs(5));
    let queue = Queue {
        store: Backend::Embedded(Store::open(store, max_bytes).unwrap()),
        wake: Arc::new(tokio::sync::Notify::new()),
        retention: Duration::from_secs(25 * 3600),
        dead_letter_retention: Duration::from_secs(7 * 86400),
    };
    ingress.attach_queue(queue.clone());
    tokio::spawn(queue::dispatch(ingress.clone(), queue.clone()));
    (ingress, queue)
}

async fn post(ingress: &Arc<Ingress>, body: Vec<u8>) -> (u16, String) {
    support::send(&ingress.router(), "/q", &http::HeaderMap::new(), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_before_delivery_and_retried_on_schedule_through_an_outage() {
    let key = support::test_key();
    let downstream = Downstream::start().await;
    downstream.set_status(503);
    let dir = temp_dir("queued", "outage");
    let (ingress, queue) = queued_ingress(
        &key,
        &downstream.url,
        &["300ms", "600ms", "1200ms", "5s"],
        &dir.join("q.db"),
        1 << 30,
    );
    // The platform hears success at once although the target is down: the event is durable.
    let started = Instant::now();
    assert_eq!(
        post(&ingress, support::alipay_payment(&key, APP_ID, "OUT-1")).await,
        (200, "success".into())
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    // Three failures, then the target recovers.
    wait("three attempts", Duration::from_secs(10), || {
        (downstream.count() >= 3).then_some(())
    })
    .await;
    downstream.set_status(204);
    let all = wait("delivery", Duration::from_secs(15), || {
        let all = downstream.all();
        all.iter().any(|r| r.ok()).then_some(all)
    })
    .await;
    assert_eq!(all.len(), 4, "three failures and one success");
    // Same id and body on every attempt; waits follow the schedule (±10% jitter).
    let ids: HashSet<&str> = all
        .iter()
        .map(|r| r.headers["webhook-id"].to_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1);
    assert!(all.windows(2).all(|w| w[0].body == w[1].body));
    for (i, expected) in [300u64, 600, 1200].into_iter().enumerate() {
        let gap = all[i + 1].at - all[i].at;
        assert!(
            gap >= Duration::from_millis(expected * 9 / 10),
            "gap {i} was {gap:?}, schedule says {expected}ms"
        );
    }
    support::check_webhook(all.last().unwrap(), WEBHOOK_SECRET);
    let view = queue.store.events(Selector::default(), 10).await.unwrap();
    assert_eq!(view[0].deliveries[0].state, "delivered");
    assert_eq!(
        view[0]
            .attempts
            .iter()
            .map(|a| a.status)
            .collect::<Vec<_>>(),
        [Some(503), Some(503), Some(503), Some(204)]
    );
    // A re-send of the same notification is a duplicate: nothing more is delivered.
    assert_eq!(
        post(&ingress, support::alipay_payment(&key, APP_ID, "OUT-1")).await,
        (200, "success".into())
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(downstream.count(), 4);
    let m = ingress.metrics.render();
    assert!(
        m.contains(
            "paynotify_notifications_total{outcome=\"duplicate\",provider=\"alipay\",route=\"q\"} 1"
        ),
        "{m}"
    );
    assert!(m.contains("paynotify_delivery_retries_total{route=\"q\"} 3"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_after_the_last_attempt_and_replay_delivers_them() {
    let key = support::test_key();
    let downstream = Downstream::start().await;
    downstream.set_status(500);
    let dir = temp_dir("queued", "dead");
    let store_path = dir.join("q.db");
    let (ingress, queue) = queued_ingress(
        &key,
        &downstream.url,
        &["100ms", "100ms"],
        &store_path,
        1 << 30,
    );
    ingress.enable_replay_endpoint();
    post(&ingress, support::alipay_payment(&key, APP_ID, "DEAD-1")).await;
    post(&ingress, support::alipay_payment(&key, APP_ID, "DEAD-2")).await;
    let dead = |queue: &Queue| {
        let store = queue.store.clone();
        async move {
            store
                .events(Selector::default(), 10)
                .await
                .unwrap()
                .iter()
                .filter(|e| e.deliveries.iter().all(|d| d.state == "dead"))
                .count()
        }
    };
    let start = Instant::now();
    while dead(&queue).await < 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "no dead letters");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(downstream.count(), 6, "three attempts each, then dead");
    // A refusal is dead at once.
    downstream.set_status(400);
    post(&ingress, support::alipay_payment(&key, APP_ID, "REFUSED-1")).await;
    while dead(&queue).await < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the refusal is not a dead letter"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(downstream.count(), 7, "one attempt for a 400");
    let m = ingress.metrics.render();
    assert!(
        m.contains("paynotify_dead_letters_total{route=\"q\"} 3"),
        "{m}"
    );

    // `paynotify events` shows them with their attempts.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_paynotify"))
        .args([
            "events",
            "--store",
            store_path.to_str().unwrap(),
            "--route",
            "q",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e["deliveries"][0]["state"] == "dead"));
    assert_eq!(
        events
            .iter()
            .map(|e| e["attempts"].as_array().unwrap().len())
            .sum::<usize>(),
        7
    );

    // Replay by id from the admin listener, the rest of the route from the CLI.
    downstream.set_status(204);
    let admin = ingress.admin_router();
    let first = events
        .iter()
        .find(|e| e["attempts"].as_array().unwrap().len() == 3)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    use tower::ServiceExt;
    let request = http::Request::post("/replay")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(json!({"ids": [first]}).to_string()))
        .unwrap();
    let response = admin.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    wait("replayed by id", Duration::from_secs(5), || {
        (downstream.all().iter().filter(|r| r.ok()).count() == 1).then_some(())
    })
    .await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_paynotify"))
        .args([
            "replay",
            "--store",
            store_path.to_str().unwrap(),
            "--route",
            "q",
            "--since",
            "2000-01-01T00:00:00Z",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "re-queued 2 deliveries"
    );
    wait(
        "every dead letter delivered",
        Duration::from_secs(5),
        || (downstream.all().iter().filter(|r| r.ok()).count() == 3).then_some(()),
    )
    .await;
    let ok_ids: HashSet<String> = downstream
        .all()
        .iter()
        .filter(|r| r.ok())
        .map(|r| r.headers["webhook-id"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(ok_ids.len(), 3);
    assert!(
        ingress
            .metrics
            .render()
            .contains("paynotify_replayed_total{route=\"all\"} 1")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let key = support::test_key();
    let downstream = Downstream::start().await;
    downstream.set_status(429);
    downstream.behaviour.lock().unwrap().retry_after = Some(1);
    let dir = temp_dir("queued", "retry-after");
    let (ingress, _queue) = queued_ingress(
        &key,
        &downstream.url,
        &["50ms", "50ms", "50ms"],
        &dir.join("q.db"),
        1 << 30,
    );
    post(&ingress, support::alipay_payment(&key, APP_ID, "RA-1")).await;
    wait("first attempt", Duration::from_secs(5), || {
        (downstream.count() == 1).then_some(())
    })
    .await;
    downstream.set_status(204);
    let all = wait("second attempt", Duration::from_secs(5), || {
        let all = downstream.all();
        (all.len() == 2).then_some(all)
    })
    .await;
    assert!(
        all[1].at - all[0].at >= Duration::from_millis(950),
        "Retry-After: 1 was not honoured"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_order_are_delivered_in_the_order_received_under_load() {
    let key = Arc::new(support::test_key());
    let downstream = Downstream::start().await;
    // Every third request fails: retries reorder everything that is allowed to reorder.
    downstream.behaviour.lock().unwrap().fail_every = Some(3);
    let dir = temp_dir("queued", "order");
    let (ingress, _queue) = queued_ingress(
        &key,
        &downstream.url,
        &["30ms"; 10],
        &dir.join("q.db"),
        1 << 30,
    );
    let orders = 40;
    let senders = (0..orders).map(|i| {
        let (key, ingress) = (key.clone(), ingress.clone());
        async move {
            let order = format!("ORD-{i}");
            let pay = paynotify::signer::alipay_payment(&key, APP_ID, &order).unwrap();
            assert_eq!(post(&ingress, pay).await.0, 200);
            let refund = paynotify::signer::alipay_refund(&key, APP_ID, &order, "RF-1").unwrap();
            assert_eq!(post(&ingress, refund).await.0, 200);
        }
    });
    futures_util::future::join_all(senders).await;
    let delivered = wait("every event delivered", Duration::from_secs(30), || {
        let ok: Vec<Value> = downstream
            .all()
            .iter()
            .filter(|r| r.ok())
            .map(|r| r.event())
            .collect();
        (ok.len() >= 2 * orders).then_some(ok)
    })
    .await;
    support::assert_payments_before_refunds(&delivered, "ORD-", orders);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_gets_the_failure_answer_and_a_metric() {
    let key = support::test_key();
    let downstream = Downstream::start().await;
    downstream.set_status(503);
    let dir = temp_dir("queued", "full");
    let (ingress, _queue) =
        queued_ingress(&key, &downstream.url, &["1h"], &dir.join("q.db"), 64 * 1024);
    let mut answered = Vec::new();
    for i in 0..200 {
        let answer = post(
            &ingress,
            support::alipay_payment(&key, APP_ID, &format!("FULL-{i}")),
        )
        .await;
        let refused = answer.0 != 200;
        answered.push(answer);
        if refused {
            break;
        }
    }
    let last = answered.last().unwrap();
    assert_eq!(
        last,
        &(503, "fail".to_string()),
        "a full store must never answer success"
    );
    assert!(answered.len() > 1);
    let m = ingress.metrics.render();
    assert!(m.contains("paynotify_notifications_total{outcome=\"store_unavailable\",provider=\"alipay\",route=\"q\"} 1"), "{m}");
    assert!(!m.contains("paynotify_store_errors_total 0"), "{m}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The real binary, SIGKILLed at random moments while notifications arrive and the target
/// fails a third of the time: every notification that got "success" reaches the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_notification_is_lost_when_the_process_is_killed() {
    let key = Arc::new(support::test_key());
    let downstream = Downstream::start().await;
    downstream.behaviour.lock().unwrap().fail_every = Some(3);
    let dir = temp_dir("queued", "crash");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = json!({
        "listen": format!("127.0.0.1:{port}"),
        "adminListen": format!("127.0.0.1:{admin}"),
        "store": {"path": "queue.db"},
        "routes": [{
            "name": "q", "path": "/q",
            "provider": {"alipay": {"appId": APP_ID, "signType": "RSA2", "publicKey": {"value": key.spki_pem().unwrap()}}},
            "targets": [{"url": downstream.url}],
            "delivery": {"mode": "Queued", "timeout": "1s", "retry": {"schedule": ["100ms", "200ms", "400ms", "800ms", "1s", "1s", "1s"]}},
            "signing": {"secret": {"value": WEBHOOK_SECRET}},
        }]
    });
    std::fs::write(dir.join("config.yaml"), config.to_string()).unwrap();
    let start_server = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_paynotify"))
            .args([
                "serve",
                "--config",
                dir.join("config.yaml").to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("serve.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap()
    };
    let server = Arc::new(std::sync::Mutex::new(start_server()));
    let acked = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let total = 240;
    let client = reqwest::Client::new();
    let senders = (0..4).map(|w| {
        let (key, acked, client) = (key.clone(), acked.clone(), client.clone());
        tokio::spawn(async move {
            for i in (w..total).step_by(4) {
                let order = format!("CRASH-{i}");
                let body = paynotify::signer::alipay_payment(&key, APP_ID, &order).unwrap();
                // The platform re-sends until it hears success; here, a few times.
                for _ in 0..3 {
                    let sent = client
                        .post(format!("http://127.0.0.1:{port}/q"))
                        .body(body.clone())
                        .send()
                        .await;
                    if let Ok(r) = sent
                        && r.text().await.ok().as_deref() == Some("success")
                    {
                        acked.lock().unwrap().insert(order.clone());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    });
    let senders: Vec<_> = senders.collect();
    // Kill and restart at random moments while the senders run; the seed is printed so that a
    // failing run can be repeated with PAYNOTIFY_CRASH_SEED.
    let seed: u64 = std::env::var("PAYNOTIFY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                .into()
        });
    eprintln!("crash test seed: PAYNOTIFY_CRASH_SEED={seed}");
    let mut state = seed | 1;
    let pauses: Vec<u64> = (0..3)
        .map(|_| {
            // xorshift64: no dependency needed for three numbers.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            200 + state % 500
        })
        .collect();
    for pause in pauses {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let mut child = server.lock().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        *child = start_server();
    }
    for s in senders {
        s.await.unwrap();
    }
    let acked: HashSet<String> = acked.lock().unwrap().clone();
    assert!(
        acked.len() > total / 2,
        "too few notifications were acknowledged ({}) to prove anything",
        acked.len()
    );
    let delivered = wait(
        "every acknowledged notification delivered",
        Duration::from_secs(60),
        || {
            let delivered: HashSet<String> = downstream
                .all()
                .iter()
                .filter(|r| r.ok())
                .map(|r| r.event()["orderId"].as_str().unwrap().to_string())
                .collect();
            acked.is_subset(&delivered).then_some(delivered)
        },
    )
    .await;
    assert!(acked.is_subset(&delivered));
    server.lock().unwrap().kill().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
