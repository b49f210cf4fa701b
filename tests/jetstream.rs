//! Queued delivery with the NATS JetStream store: real `nats-server`, real `paynotify serve`
//! processes as ingress replicas sharing one stream. Dedup across replicas, a replica killed
//! with SIGKILL, NATS stopped (failure answer and a metric), dead letters with replay, and
//! per-order ordering across replicas.

mod support;

#[path = "support/nats.rs"]
mod nats;

use nats::NatsServer;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Downstream, TestKey, WEBHOOK_SECRET, free_port, temp_dir, wait};

const APP_ID: &str = "2021000000000001";

/// One `paynotify serve` process with a Queued Alipay route at /q on the JetStream store.
struct Replica {
    port: u16,
    admin: u16,
    config: PathBuf,
    child: Option<Child>,
}

impl Replica {
    fn start(
        dir: &std::path::Path,
        name: &str,
        key: &TestKey,
        nats: &str,
        target: &str,
        schedule: &[&str],
    ) -> Replica {
        Self::start_replicated(dir, name, key, nats, 1, target, schedule)
    }

    fn start_replicated(
        dir: &std::path::Path,
        name: &str,
        key: &TestKey,
        nats: &str,
        replicas: usize,
        target: &str,
        schedule: &[&str],
    ) -> Replica {
        let (port, admin) = (free_port(), free_port());
        let config = json!({
            "listen": format!("127.0.0.1:{port}"),
            "adminListen": format!("127.0.0.1:{admin}"),
            "store": {"nats": {"url": nats, "stream": "PAYNOTIFY", "replicas": replicas, "publishTimeout": "1s"}},
            "admin": {"replay": true},
            "routes": [{
                "name": "q", "path": "/q",
                "provider": {"alipay": {"appId": APP_ID, "signType": "RSA2", "publicKey": {"value": key.spki_pem().unwrap()}}},
                "targets": [{"url": target}],
                "delivery": {"mode": "Queued", "timeout": "1s", "retry": {"schedule": schedule}},
                "signing": {"secret": {"value": WEBHOOK_SECRET}},
            }]
        });
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, config.to_string()).unwrap();
        let mut replica = Replica {
            port,
            admin,
            config: path,
            child: None,
        };
        replica.spawn(dir, name);
        replica
    }

    fn spawn(&mut self, dir: &std::path::Path, name: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))
            .unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_paynotify"))
                .args(["serve", "--config", self.config.to_str().unwrap()])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "replica {name} did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/q", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// The sum of the samples of `name` whose labels include every one of `labels`.
    async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Posts a notification; the answer body, or None when no answer came.
async fn post(client: &reqwest::Client, url: &str, body: &[u8]) -> Option<String> {
    let r = client.post(url).body(body.to_vec()).send().await.ok()?;
    r.text().await.ok()
}

/// Waits until every one of `ready`'s replicas answers a first notification with success
/// (the streams are set up in the background after the start).
async fn until_ready(client: &reqwest::Client, key: &TestKey, replicas: &[&Replica]) {
    for r in replicas {
        let body = support::alipay_payment(key, APP_ID, "WARMUP");
        let start = Instant::now();
        while post(client, &r.url(), &body).await.as_deref() != Some("success") {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the JetStream store never became ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Successful deliveries per order id (the warm-up excluded).
fn delivered_orders(downstream: &Downstream) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in downstream.all().iter().filter(|r| r.ok()) {
        let order = r.event()["orderId"].as_str().unwrap().to_string();
        if order != "WARMUP" {
            *out.entry(order).or_insert(0) += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_resent_to_another_replica_is_delivered_once() {
    let server = NatsServer::start("dedup");
    let key = support::test_key();
    let downstream = Downstream::start().await;
    let dir = temp_dir("js", "dedup");
    let a = Replica::start(&dir, "a", &key, &server.url, &downstream.url, &["200ms"; 3]);
    let b = Replica::start(&dir, "b", &key, &server.url, &downstream.url, &["200ms"; 3]);
    let client = reqwest::Client::new();
    until_ready(&client, &key, &[&a, &b]).await;
    let n = 20;
    for i in 0..n {
        let body = support::alipay_payment(&key, APP_ID, &format!("DUP-{i}"));
        // The platform's retry lands on the other replica behind the load balancer.
        assert_eq!(
            post(&client, &a.url(), &body).await.as_deref(),
            Some("success")
        );
        assert_eq!(
            post(&client, &b.url(), &body).await.as_deref(),
            Some("success")
        );
    }
    wait(
        "every notification delivered",
        Duration::from_secs(30),
        || (delivered_orders(&downstream).len() == n).then_some(()),
    )
    .await;
    // Time for a wrongly duplicated delivery to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let delivered = delivered_orders(&downstream);
    assert_eq!(delivered.len(), n);
    assert!(
        delivered.values().all(|&c| c == 1),
        "some notification was delivered twice: {delivered:?}"
    );
    let dup_b = b
        .metric("paynotify_notifications_total", &["outcome=\"duplicate\""])
        .await;
    assert!(
        dup_b >= n as f64,
        "replica b should have seen {n} duplicates, saw {dup_b}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_replica_loses_nothing() {
    let server = NatsServer::start("kill");
    let key = Arc::new(support::test_key());
    let downstream = Downstream::start().await;
    downstream.behaviour.lock().unwrap().fail_every = Some(3);
    let dir = temp_dir("js", "kill");
    let schedule = ["100ms", "200ms", "400ms", "800ms", "1s", "1s", "1s", "1s"];
    let mut a = Replica::start(&dir, "a", &key, &server.url, &downstream.url, &schedule);
    let b = Replica::start(&dir, "b", &key, &server.url, &downstream.url, &schedule);
    let client = reqwest::Client::new();
    until_ready(&client, &key, &[&a, &b]).await;
    let urls = [a.url(), b.url()];
    let acked = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let total = 200;
    let senders: Vec<_> = (0..4)
        .map(|w| {
            let (key, acked, client, urls) =
                (key.clone(), acked.clone(), client.clone(), urls.clone());
            tokio::spawn(async move {
                for i in (w..total).step_by(4) {
                    let order = format!("KILL-{i}");
                    let body = paynotify::signer::alipay_payment(&key, APP_ID, &order).unwrap();
                    // Retries alternate between the replicas, as behind a load balancer.
                    for attempt in 0..4 {
                        if post(&client, &urls[(i + attempt) % 2], &body)
                            .await
                            .as_deref()
                            == Some("success")
                        {
                            acked.lock().unwrap().insert(order.clone());
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    a.kill();
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > total / 2,
        "too few acknowledged ({}) to prove anything",
        acked.len()
    );
    // Messages replica a held come back to b once their ack wait (2 × timeout + 5 s) ends.
    wait(
        "every acknowledged notification delivered",
        Duration::from_secs(60),
        || {
            let delivered: HashSet<String> = delivered_orders(&downstream).into_keys().collect();
            acked.is_subset(&delivered).then_some(())
        },
    )
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stopped_gets_the_failure_answer_and_a_metric() {
    let mut server = NatsServer::start("stopped");
    let key = support::test_key();
    let downstream = Downstream::start().await;
    let dir = temp_dir("js", "stopped");
    let a = Replica::start(&dir, "a", &key, &server.url, &downstream.url, &["200ms"; 3]);
    let client = reqwest::Client::new();
    until_ready(&client, &key, &[&a]).await;
    server.stop();
    let body = support::alipay_payment(&key, APP_ID, "WHILE-DOWN");
    let answer = post(&client, &a.url(), &body).await;
    assert!(answer.is_some(), "the ingress must answer, not hang up");
    assert_ne!(
        answer.as_deref(),
        Some("success"),
        "success without a durable write"
    );
    assert!(a.metric("paynotify_store_errors_total", &[]).await >= 1.0);
    let unavailable = a
        .metric(
            "paynotify_notifications_total",
            &["outcome=\"store_unavailable\""],
        )
        .await;
    assert!(unavailable >= 1.0, "no store_unavailable outcome counted");
    assert!(
        downstream
            .all()
            .iter()
            .all(|r| r.event()["orderId"] != "WHILE-DOWN")
    );
    // The platform retries; once NATS is back the notification is stored and delivered.
    server.resume();
    let start = Instant::now();
    while post(&client, &a.url(), &body).await.as_deref() != Some("success") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never recovered after NATS came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait(
        "the retried notification delivered",
        Duration::from_secs(30),
        || {
            delivered_orders(&downstream)
                .contains_key("WHILE-DOWN")
                .then_some(())
        },
    )
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_paynotify"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_reach_the_dead_letter_stream_and_replay_delivers_them() {
    let server = NatsServer::start("dead");
    let key = support::test_key();
    let downstream = Downstream::start().await;
    let dir = temp_dir("js", "dead");
    let a = Replica::start(
        &dir,
        "a",
        &key,
        &server.url,
        &downstream.url,
        &["100ms", "100ms"],
    );
    let client = reqwest::Client::new();
    until_ready(&client, &key, &[&a]).await;
    wait("warm-up delivered", Duration::from_secs(20), || {
        (downstream.count() >= 1).then_some(())
    })
    .await;
    // 503 three times (the last attempt of a two-step schedule) → a dead letter.
    downstream.set_status(503);
    let body = support::alipay_payment(&key, APP_ID, "DEAD-1");
    assert_eq!(
        post(&client, &a.url(), &body).await.as_deref(),
        Some("success")
    );
    let start = Instant::now();
    while a.metric("paynotify_dead_letters", &["route=\"q\""]).await < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no dead letter counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let attempts = downstream
        .all()
        .iter()
        .filter(|r| r.event()["orderId"] == "DEAD-1")
        .count();
    assert_eq!(
        attempts, 3,
        "one attempt plus the two retries of the schedule"
    );
    let config = a.config.to_str().unwrap().to_string();
    let (ok, out, err) = cli(&["events", "--config", &config, "--route", "q"]);
    assert!(ok, "{err}");
    let dead: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["deliveries"][0]["state"] == "dead")
        .collect();
    assert_eq!(dead.len(), 1, "{out}");
    assert_eq!(dead[0]["attempts"].as_array().unwrap().len(), 3, "{out}");
    assert_eq!(dead[0]["attempts"][2]["status"], 503);
    let id = dead[0]["id"].as_str().unwrap().to_string();
    // Replay through the CLI, with NATS named on the command line.
    downstream.set_status(200);
    let (ok, out, err) = cli(&[
        "replay",
        "--nats-url",
        &server.url,
        "--nats-stream",
        "PAYNOTIFY",
        "--id",
        &id,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("re-queued 1 deliveries"), "{out}");
    wait(
        "the replayed dead letter delivered",
        Duration::from_secs(30),
        || {
            delivered_orders(&downstream)
                .contains_key("DEAD-1")
                .then_some(())
        },
    )
    .await;
    let delivered = downstream
        .all()
        .into_iter()
        .find(|r| r.ok() && r.event()["orderId"] == "DEAD-1")
        .unwrap();
    assert_eq!(
        support::check_webhook(&delivered, WEBHOOK_SECRET)["id"],
        id.as_str()
    );
    let (ok, out, err) = cli(&["events", "--config", &config, "--id", &id]);
    assert!(ok, "{err}");
    let event: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(event["deliveries"][0]["state"], "delivered", "{out}");
    assert_eq!(event["attempts"].as_array().unwrap().len(), 4, "{out}");
    // The dead-letter stream holds the event.
    let js = async_nats::jetstream::new(async_nats::connect(&server.url).await.unwrap());
    let mut dlq = js.get_stream("PAYNOTIFY_DLQ").await.unwrap();
    assert_eq!(dlq.info().await.unwrap().state.messages, 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_order_keep_their_order_across_replicas() {
    let server = NatsServer::start("order");
    let key = Arc::new(support::test_key());
    let downstream = Downstream::start().await;
    // Every third request fails: retries reorder everything that is allowed to reorder.
    downstream.behaviour.lock().unwrap().fail_every = Some(3);
    let dir = temp_dir("js", "order");
    let a = Replica::start(&dir, "a", &key, &server.url, &downstream.url, &["50ms"; 10]);
    let b = Replica::start(&dir, "b", &key, &server.url, &downstream.url, &["50ms"; 10]);
    let client = reqwest::Client::new();
    until_ready(&client, &key, &[&a, &b]).await;
    let orders = 30;
    let (ua, ub) = (a.url(), b.url());
    let senders = (0..orders).map(|i| {
        let (key, client, ua, ub) = (key.clone(), client.clone(), ua.clone(), ub.clone());
        async move {
            let order = format!("ORD-{i}");
            let pay = paynotify::signer::alipay_payment(&key, APP_ID, &order).unwrap();
            assert_eq!(post(&client, &ua, &pay).await.as_deref(), Some("success"));
            let refund = paynotify::signer::alipay_refund(&key, APP_ID, &order, "RF-1").unwrap();
            assert_eq!(
                post(&client, &ub, &refund).await.as_deref(),
                Some("success")
            );
        }
    });
    futures_util::future::join_all(senders).await;
    let delivered = wait("every event delivered", Duration::from_secs(60), || {
        let ok: Vec<Value> = downstream
            .all()
            .iter()
            .filter(|r| r.ok())
            .map(|r| r.event())
            .filter(|e| e["orderId"] != "WARMUP")
            .collect();
        let kinds: HashSet<(String, String)> = ok
            .iter()
            .map(|e| {
                (
                    e["orderId"].as_str().unwrap().to_string(),
                    e["type"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        (kinds.len() >= 2 * orders).then_some(ok)
    })
    .await;
    support::assert_payments_before_refunds(&delivered, "ORD-", orders);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_replicated_on_three_servers_survives_losing_one() {
    let mut servers = NatsServer::cluster("r3");
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let key = Arc::new(support::test_key());
    let downstream = Downstream::start().await;
    let dir = temp_dir("js", "r3");
    let a = Replica::start_replicated(
        &dir,
        "a",
        &key,
        &urls.join(","),
        3,
        &downstream.url,
        &["200ms"; 8],
    );
    let client = reqwest::Client::new();
    until_ready(&client, &key, &[&a]).await;
    let js = async_nats::jetstream::new(async_nats::connect(urls[0].as_str()).await.unwrap());
    let mut stream = js.get_stream("PAYNOTIFY").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    // The stream's leader is the server to lose: a new leader must be elected.
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a stream leader");
    let leader = (0..3)
        .find(|i| leader == format!("paynotify-test-r3-{i}"))
        .expect("the leader is one of ours");
    drop(js);
    let mut acked = HashSet::new();
    let total = 60;
    for i in 0..total {
        if i == total / 3 {
            // Lose the leader (the stream keeps a quorum of two).
            servers[leader].stop();
        }
        let order = format!("R3-{i}");
        let body = paynotify::signer::alipay_payment(&key, APP_ID, &order).unwrap();
        for _ in 0..20 {
            if post(&client, &a.url(), &body).await.as_deref() == Some("success") {
                acked.insert(order.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    assert!(
        acked.len() > total * 2 / 3,
        "too few acknowledged ({}) with two of three servers up",
        acked.len()
    );
    wait(
        "every acknowledged notification delivered",
        Duration::from_secs(60),
        || {
            let delivered: HashSet<String> = delivered_orders(&downstream).into_keys().collect();
            acked.is_subset(&delivered).then_some(())
        },
    )
    .await;
    let _ = std::fs::remove_dir_all(dir);
}
