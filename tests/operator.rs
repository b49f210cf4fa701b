//! The operator against a real kube-apiserver and etcd (tests/support/control_plane.rs): the
//! CRD's admission rules, the controller's status, events, table and leadership, and the
//! cluster ingress serving what the controller published.

#[path = "support/control_plane.rs"]
mod control_plane;
mod support;

use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Client, ResourceExt};
use paynotify::controller::{self, ControllerConfig, ControllerError};
use paynotify::crd::{self, PaymentNotifyRoute};
use paynotify::ingress::{Ingress, cluster};
use paynotify::signer::PlatformKey;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Downstream, WEBHOOK_SECRET};
use tokio::sync::{OnceCell, oneshot};

const APP_ID: &str = "2021000000000001";

/// Installs the generated CRD once per test binary and waits until it is Established.
async fn client() -> Client {
    static CRD: OnceCell<()> = OnceCell::const_new();
    let client = control_plane::client().await;
    let _ = tracing_subscriber::fmt()
        .with_env_filter("paynotify=debug")
        .with_test_writer()
        .try_init();
    CRD.get_or_init(|| async {
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.patch(
            crd::crd().metadata.name.as_deref().unwrap(),
            &PatchParams::apply("paynotify-tests").force(),
            &Patch::Apply(crd::crd()),
        )
        .await
        .unwrap();
        wait("CRD established", Duration::from_secs(30), || async {
            let crd = crds.get("paymentnotifyroutes.paynotify.dev").await.ok()?;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        })
        .await;
    })
    .await;
    client
}

/// Polls `check` until it returns Some, or panics after `limit`.
async fn wait<T, F: Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A controller running in this process, watching `ns` only.
struct RunningController {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ControllerError>>,
    admin: u16,
}

impl RunningController {
    fn start(client: &Client, ns: &str, identity: &str) -> Self {
        let admin = free_port();
        let config = ControllerConfig {
            namespace: ns.into(),
            watch_namespaces: vec![ns.into()],
            table_secret: "paynotify-routing-table".into(),
            lease_name: "paynotify-controller".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(3),
            cluster_domain: "cluster.local".into(),
            public_base_url: Some("https://pay.example.com".into()),
            admin_listen: ([127, 0, 0, 1], admin).into(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(client.clone(), config, async move {
            let _ = stopped.await;
        }));
        RunningController {
            stop: Some(stop),
            task,
            admin,
        }
    }

    async fn metric(&self, line_prefix: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with(line_prefix))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    }

    async fn is_leader(&self) -> bool {
        self.metric("paynotify_controller_leader ").await == Some(1.0)
    }

    async fn stop(mut self) -> Result<(), ControllerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap()
    }
}

/// A cluster ingress running in this process, following the table Secret of `ns`.
fn start_ingress(client: &Client, ns: &str) -> (Arc<Ingress>, tokio::task::JoinHandle<()>) {
    let ingress = Ingress::new(
        paynotify::ingress::Limits {
            max_body_bytes: 256 * 1024,
            request_timeout: Duration::from_secs(10),
        },
        paynotify::delivery::dedup::Dedup::new(Duration::from_secs(25 * 3600), 10_000),
        paynotify::delivery::Forwarder::new().unwrap(),
        paynotify::ingress::system_clock(),
    );
    let source = cluster::TableSource {
        namespace: ns.into(),
        name: "paynotify-routing-table".into(),
    };
    let task = tokio::spawn(cluster::follow(client.clone(), source, ingress.clone()));
    (ingress, task)
}

/// A client for a user whose only right is `get`/`watch` on the table Secret by name.
async fn least_privileged_ingress_client(admin: &Client, ns: &str) -> Client {
    use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
    let user = format!("paynotify-ingress-{ns}");
    let role = Role {
        metadata: kube::api::ObjectMeta {
            name: Some("paynotify-ingress".into()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["".into()]),
            resources: Some(vec!["secrets".into()]),
            resource_names: Some(vec!["paynotify-routing-table".into()]),
            verbs: vec!["get".into(), "watch".into()],
            ..Default::default()
        }]),
    };
    let binding = RoleBinding {
        metadata: kube::api::ObjectMeta {
            name: Some("paynotify-ingress".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "paynotify-ingress".into(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: user.clone(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Default::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let client = control_plane::shared().user_client(&user, &[]).await;
    // It cannot read any other Secret.
    let denied = Api::<Secret>::namespaced(client.clone(), ns)
        .get("webhook")
        .await;
    assert!(
        matches!(denied, Err(kube::Error::Api(ref e)) if e.code == 403),
        "{denied:?}"
    );
    client
}

async fn put_secret(client: &Client, ns: &str, name: &str, data: &[(&str, &[u8])]) {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Default::default()
    };
    api.patch(
        name,
        &PatchParams::apply("paynotify-tests").force(),
        &Patch::Apply(&secret),
    )
    .await
    .unwrap();
}

fn alipay_route(name: &str, path: &str, key_secret: &str, target: Value) -> Value {
    json!({
        "apiVersion": "paynotify.dev/v1alpha1",
        "kind": "PaymentNotifyRoute",
        "metadata": {"name": name},
        "spec": {
            "path": path,
            "provider": {"alipay": {"appId": APP_ID, "signType": "RSA2",
                "publicKey": {"secretKeyRef": {"name": key_secret, "key": "alipay_public_key"}}}},
            "targets": [target],
            "delivery": {"mode": "Synchronous", "timeout": "3s"},
            "signing": {"secret": {"secretKeyRef": {"name": "webhook", "key": "secret"}}}
        }
    })
}

/// Creates a route from raw JSON, as kubectl would send it (no client-side typing).
async fn create_route(
    client: &Client,
    ns: &str,
    route: &Value,
) -> Result<DynamicObject, kube::Error> {
    let resource = ApiResource::erase::<PaymentNotifyRoute>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(route.clone()).unwrap(),
    )
    .await
}

async fn condition(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let api: Api<PaymentNotifyRoute> = Api::namespaced(client.clone(), ns);
    let route = api.get(name).await.ok()?;
    let c = route
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status, c.reason, c.message))
}

async fn wait_condition(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> String {
    wait(
        &format!("{name} {type_}={status} ({reason})"),
        Duration::from_secs(30),
        || async {
            let (s, r, m) = condition(client, ns, name, type_).await?;
            (s == status && r == reason).then_some(m)
        },
    )
    .await
}

async fn table_generation(client: &Client, ns: &str) -> Option<u64> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = api.get_opt("paynotify-routing-table").await.ok()??;
    Some(
        paynotify::controller::publish::read_table(&secret)
            .ok()?
            .generation,
    )
}

#[tokio::test]
async fn admission_rules_refuse_bad_routes_with_actionable_messages() {
    let client = client().await;
    let ns = control_plane::unique_namespace("cel").await;
    let good = alipay_route(
        "good",
        "/notify/good",
        "alipay",
        json!({"url": "http://orders:8080/pay"}),
    );
    create_route(&client, &ns, &good).await.unwrap();
    let cases: Vec<(Value, &str)> = vec![
        (
            {
                let mut r = good.clone();
                r["spec"]["path"] = json!("notify");
                r
            },
            "path must start with /",
        ),
        (
            {
                let mut r = good.clone();
                r["spec"]["path"] = json!("/a/../b");
                r
            },
            "path must not contain ..",
        ),
        (
            {
                let mut r = good.clone();
                r["spec"]["path"] = json!("/a?x=1");
                r
            },
            "must not carry a query",
        ),
        (
            {
                let mut r = good.clone();
                r["spec"]["targets"] = json!([]);
                r
            },
            "give at least one target",
        ),
        (
            {
                let mut r = good.clone();
                r["spec"]["targets"] = json!([{"url": "http://a/", "log": {}}]);
                r
            },
            "exactly one of url, service or log",
        ),
        (
            {
                let mut r = good.clone();
                r["spec"]["targets"] = json!([{"url": "ftp://a/"}]);
                r
            },
            "must be http:// or https://",
        ),
        (
            {
                let mut r = good.clone();
                r["spec"]["delivery"]["timeout"] = json!("3 seconds");
                r
            },
            "delivery.timeout must be a duration",
        ),
        (
            {
                let mut r = good.clone();
                r["spec"]["provider"]["wechatPayV2"] = json!({"appId": "wx", "mchId": "1", "signType": "MD5",
                    "apiKey": {"secretKeyRef": {"name": "k", "key": "k"}}});
                r
            },
            "set exactly one of provider.alipay",
        ),
        (
            {
                let mut r = good.clone();
                r["spec"]["provider"] = json!({"wechatPayV3": {"mchId": "1",
                    "apiV3Key": {"secretKeyRef": {"name": "k", "key": "k"}}, "maxClockSkew": "5 minutes"}});
                r
            },
            "give provider.wechatPayV3.platformCertificates, publicKey, or both",
        ),
    ];
    for (i, (mut route, message)) in cases.into_iter().enumerate() {
        route["metadata"]["name"] = json!(format!("bad-{i}"));
        match create_route(&client, &ns, &route).await {
            Err(kube::Error::Api(e)) => assert!(
                e.message.contains(message),
                "case {i}: {:?} does not contain {message:?}",
                e.message
            ),
            other => panic!("case {i} ({message}) was not refused: {other:?}"),
        }
    }
}

#[tokio::test]
async fn controller_publishes_ready_routes_and_the_ingress_serves_them() {
    let client = client().await;
    let ns = control_plane::unique_namespace("e2e").await;
    let key = PlatformKey::generate().unwrap();
    put_secret(
        &client,
        &ns,
        "alipay",
        &[("alipay_public_key", key.spki_base64().unwrap().as_bytes())],
    )
    .await;
    put_secret(
        &client,
        &ns,
        "webhook",
        &[("secret", WEBHOOK_SECRET.as_bytes())],
    )
    .await;
    let downstream = Downstream::start().await;
    // The ingress runs as a user that may only get and watch the one table Secret.
    let ingress_client = least_privileged_ingress_client(&client, &ns).await;
    let (ingress, follow) = start_ingress(&ingress_client, &ns);
    // Not ready before the first table exists.
    assert!(!ingress.is_ready());
    create_route(
        &client,
        &ns,
        &alipay_route(
            "shop",
            "/notify/shop/alipay",
            "alipay",
            json!({"url": downstream.url}),
        ),
    )
    .await
    .unwrap();
    let ctl = RunningController::start(&client, &ns, "controller-0");

    wait_condition(&client, &ns, "shop", "Ready", "True", "Ready").await;
    let api: Api<PaymentNotifyRoute> = Api::namespaced(client.clone(), &ns);
    let status = api.get("shop").await.unwrap().status.unwrap();
    assert_eq!(status.provider.as_deref(), Some("alipay"));
    assert_eq!(
        status.callback_url.as_deref(),
        Some("https://pay.example.com/notify/shop/alipay")
    );
    assert_eq!(status.observed_generation, Some(1));
    let first_fingerprint = status.keys[0].fingerprint.clone();
    assert!(first_fingerprint.starts_with("SHA256:"));
    for c in ["KeysResolved", "PathAccepted"] {
        assert_eq!(condition(&client, &ns, "shop", c).await.unwrap().0, "True");
    }

    // The ingress loads the published table and serves the route.
    wait("ingress ready", Duration::from_secs(30), || async {
        ingress.is_ready().then_some(())
    })
    .await;
    let body = paynotify::signer::alipay_payment(&key, APP_ID, "K8S-0001").unwrap();
    let headers = http::HeaderMap::new();
    assert_eq!(
        support::send(&ingress.router(), "/notify/shop/alipay", &headers, body).await,
        (200, "success".into())
    );
    let delivered = downstream.take();
    assert_eq!(delivered.len(), 1);
    let event = support::check_webhook(&delivered[0], WEBHOOK_SECRET);
    assert_eq!(event["route"], format!("{ns}/shop"));
    assert_eq!(event["orderId"], "K8S-0001");

    // Events record the transition.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    wait("Ready event", Duration::from_secs(10), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.involved_object.name.as_deref() == Some("shop")
                    && e.reason.as_deref() == Some("Ready")
            })
            .then_some(())
    })
    .await;

    // Rotating the key in the Secret: a new table, the old key refused, the new one served.
    let generation = table_generation(&client, &ns).await.unwrap();
    let rotated = PlatformKey::generate().unwrap();
    put_secret(
        &client,
        &ns,
        "alipay",
        &[(
            "alipay_public_key",
            rotated.spki_base64().unwrap().as_bytes(),
        )],
    )
    .await;
    wait("rotated table", Duration::from_secs(30), || async {
        (ingress.table().generation > generation).then_some(())
    })
    .await;
    let fingerprint = api.get("shop").await.unwrap().status.unwrap().keys[0]
        .fingerprint
        .clone();
    assert_ne!(fingerprint, first_fingerprint);
    let old = paynotify::signer::alipay_payment(&key, APP_ID, "K8S-0002").unwrap();
    assert_eq!(
        support::send(&ingress.router(), "/notify/shop/alipay", &headers, old).await,
        (400, "fail".into())
    );
    let new = paynotify::signer::alipay_payment(&rotated, APP_ID, "K8S-0003").unwrap();
    assert_eq!(
        support::send(&ingress.router(), "/notify/shop/alipay", &headers, new).await,
        (200, "success".into())
    );

    // A table that does not load is counted; the last good one keeps serving.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    ctl.stop().await.unwrap();
    let mut broken = secrets.get("paynotify-routing-table").await.unwrap();
    broken.data = Some(BTreeMap::from([(
        "table.json".to_string(),
        ByteString(br#"{"generation": 999, "routes": [{"name": "x"}]}"#.to_vec()),
    )]));
    broken.metadata.managed_fields = None;
    secrets
        .replace("paynotify-routing-table", &PostParams::default(), &broken)
        .await
        .unwrap();
    wait("refused table counted", Duration::from_secs(10), || async {
        ingress
            .metrics
            .render()
            .contains("paynotify_config_reload_errors_total 1")
            .then_some(())
    })
    .await;
    let again = paynotify::signer::alipay_payment(&rotated, APP_ID, "K8S-0004").unwrap();
    assert_eq!(
        support::send(&ingress.router(), "/notify/shop/alipay", &headers, again).await,
        (200, "success".into())
    );
    follow.abort();
}

#[tokio::test]
async fn statuses_explain_what_to_fix() {
    let client = client().await;
    let ns = control_plane::unique_namespace("status").await;
    let key = PlatformKey::generate().unwrap();
    put_secret(
        &client,
        &ns,
        "webhook",
        &[("secret", WEBHOOK_SECRET.as_bytes())],
    )
    .await;
    let ctl = RunningController::start(&client, &ns, "controller-0");
    let target = json!({"service": {"name": "orders", "port": 8080, "path": "/events"}});

    // A missing Secret, then the Secret appears.
    create_route(
        &client,
        &ns,
        &alipay_route("waiting", "/notify/waiting", "late", target.clone()),
    )
    .await
    .unwrap();
    let message = wait_condition(
        &client,
        &ns,
        "waiting",
        "KeysResolved",
        "False",
        "SecretNotFound",
    )
    .await;
    assert!(
        message.contains(&format!("Secret {ns}/late not found")),
        "{message}"
    );
    assert_eq!(
        condition(&client, &ns, "waiting", "Ready").await.unwrap().1,
        "SecretNotFound"
    );
    put_secret(
        &client,
        &ns,
        "late",
        &[("alipay_public_key", key.spki_base64().unwrap().as_bytes())],
    )
    .await;
    wait_condition(&client, &ns, "waiting", "Ready", "True", "Ready").await;

    // A key that is not a key.
    put_secret(
        &client,
        &ns,
        "garbage",
        &[("alipay_public_key", b"not a key")],
    )
    .await;
    create_route(
        &client,
        &ns,
        &alipay_route("badkey", "/notify/badkey", "garbage", target.clone()),
    )
    .await
    .unwrap();
    let message = wait_condition(
        &client,
        &ns,
        "badkey",
        "KeysResolved",
        "False",
        "KeyInvalid",
    )
    .await;
    assert!(message.contains("provider.alipay.publicKey"), "{message}");

    // The older route keeps a contested path; when it goes, the newer one takes over.
    // (Creation times have one-second resolution; a tie would go to the smaller name.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    create_route(
        &client,
        &ns,
        &alipay_route("second", "/notify/waiting", "late", target.clone()),
    )
    .await
    .unwrap();
    let message = wait_condition(
        &client,
        &ns,
        "second",
        "PathAccepted",
        "False",
        "PathConflict",
    )
    .await;
    assert!(message.contains(&format!("{ns}/waiting")), "{message}");
    let api: Api<PaymentNotifyRoute> = Api::namespaced(client.clone(), &ns);
    api.delete("waiting", &DeleteParams::default())
        .await
        .unwrap();
    wait_condition(&client, &ns, "second", "Ready", "True", "Ready").await;

    // The published table holds exactly the ready routes, with the Service resolved.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let doc = wait(
        "table without the deleted route",
        Duration::from_secs(15),
        || async {
            let doc = paynotify::controller::publish::read_table(
                &secrets.get("paynotify-routing-table").await.ok()?,
            )
            .ok()?;
            (doc.routes
                .iter()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
                == [format!("{ns}/second")])
            .then_some(doc)
        },
    )
    .await;
    assert_eq!(
        doc.routes[0].spec.targets[0].url.as_deref(),
        Some(format!("http://orders.{ns}.svc.cluster.local:8080/events").as_str())
    );
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn a_secret_change_reconciles_only_the_routes_that_use_it() {
    let client = client().await;
    let ns = control_plane::unique_namespace("mapping").await;
    let (a, b) = (
        PlatformKey::generate().unwrap(),
        PlatformKey::generate().unwrap(),
    );
    put_secret(
        &client,
        &ns,
        "webhook",
        &[("secret", WEBHOOK_SECRET.as_bytes())],
    )
    .await;
    put_secret(
        &client,
        &ns,
        "key-a",
        &[("alipay_public_key", a.spki_base64().unwrap().as_bytes())],
    )
    .await;
    put_secret(
        &client,
        &ns,
        "key-b",
        &[("alipay_public_key", b.spki_base64().unwrap().as_bytes())],
    )
    .await;
    let target = json!({"url": "http://orders:8080/"});
    create_route(
        &client,
        &ns,
        &alipay_route("a", "/a", "key-a", target.clone()),
    )
    .await
    .unwrap();
    create_route(&client, &ns, &alipay_route("b", "/b", "key-b", target))
        .await
        .unwrap();
    let ctl = RunningController::start(&client, &ns, "controller-0");
    wait_condition(&client, &ns, "a", "Ready", "True", "Ready").await;
    wait_condition(&client, &ns, "b", "Ready", "True", "Ready").await;
    // Let the status writes' own watch events settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let count = |route: &str| {
        format!("paynotify_controller_route_reconciles_total{{route=\"{ns}/{route}\"}}")
    };
    let (a0, b0) = (
        ctl.metric(&count("a")).await.unwrap(),
        ctl.metric(&count("b")).await.unwrap(),
    );
    put_secret(
        &client,
        &ns,
        "key-a",
        &[("alipay_public_key", b.spki_base64().unwrap().as_bytes())],
    )
    .await;
    wait("route a reconciled", Duration::from_secs(15), || async {
        (ctl.metric(&count("a")).await? > a0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ctl.metric(&count("b")).await.unwrap(),
        b0,
        "route b does not use key-a"
    );
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn one_leader_writes_and_a_lost_lease_stops_the_process() {
    let client = client().await;
    let ns = control_plane::unique_namespace("lease").await;
    let key = PlatformKey::generate().unwrap();
    put_secret(
        &client,
        &ns,
        "webhook",
        &[("secret", WEBHOOK_SECRET.as_bytes())],
    )
    .await;
    put_secret(
        &client,
        &ns,
        "alipay",
        &[("alipay_public_key", key.spki_base64().unwrap().as_bytes())],
    )
    .await;
    let first = RunningController::start(&client, &ns, "controller-0");
    let second = RunningController::start(&client, &ns, "controller-1");
    wait("a leader", Duration::from_secs(20), || async {
        (first.is_leader().await || second.is_leader().await).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        first.is_leader().await ^ second.is_leader().await,
        "exactly one leader"
    );
    let (leader, standby) = if first.is_leader().await {
        (first, second)
    } else {
        (second, first)
    };
    create_route(
        &client,
        &ns,
        &alipay_route("r1", "/r1", "alipay", json!({"log": {}})),
    )
    .await
    .unwrap();
    wait_condition(&client, &ns, "r1", "Ready", "True", "Ready").await;
    assert_eq!(
        standby
            .metric("paynotify_controller_reconciles_total{result=\"ok\"}")
            .await,
        None,
        "the standby writes nothing"
    );

    // The leader steps down: the standby takes over and serves new routes.
    leader.stop().await.unwrap();
    wait(
        "standby takes the lease",
        Duration::from_secs(20),
        || async { standby.is_leader().await.then_some(()) },
    )
    .await;
    create_route(
        &client,
        &ns,
        &alipay_route("r2", "/r2", "alipay", json!({"log": {}})),
    )
    .await
    .unwrap();
    wait_condition(&client, &ns, "r2", "Ready", "True", "Ready").await;

    // Someone else takes the Lease: the leader must stop rather than keep writing.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let mut lease = leases.get("paynotify-controller").await.unwrap();
    let spec = lease.spec.get_or_insert_with(Default::default);
    spec.holder_identity = Some("intruder".into());
    spec.lease_duration_seconds = Some(3600);
    spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    lease.metadata.managed_fields = None;
    leases
        .replace(&lease.name_any(), &PostParams::default(), &lease)
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), standby.task)
        .await
        .expect("the leader stops");
    assert!(matches!(result.unwrap(), Err(ControllerError::LeaseLost)));
}

/// Creates every object of a multi-document YAML file (Namespaces, Secrets, routes).
async fn apply_file(client: &Client, path: &std::path::Path) {
    let text = std::fs::read_to_string(path).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(doc).unwrap();
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_json::from_value(value.clone()).unwrap();
        let resource = match value["kind"].as_str().unwrap() {
            "Namespace" => ApiResource::erase::<k8s_openapi::api::core::v1::Namespace>(&()),
            "Secret" => ApiResource::erase::<Secret>(&()),
            "PaymentNotifyRoute" => ApiResource::erase::<PaymentNotifyRoute>(&()),
            other => panic!("unexpected kind {other} in {}", path.display()),
        };
        let api: Api<DynamicObject> = match object.metadata.namespace.as_deref() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        api.patch(
            &object.name_any(),
            &PatchParams::apply("paynotify-tests").force(),
            &Patch::Apply(&object),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[tokio::test]
async fn the_kubernetes_examples_become_ready_and_read_well_in_kubectl() {
    let client = client().await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in &files {
        apply_file(&client, file).await;
    }
    let ns = "paynotify-demo";
    let ctl = RunningController::start(&client, ns, "controller-0");
    for route in ["demo-alipay", "demo-wechatpay-v2", "demo-wechatpay-v3"] {
        wait_condition(&client, ns, route, "Ready", "True", "Ready").await;
    }
    // What `kubectl get pnr -A` prints: the apiserver renders the printer columns.
    let request = http::Request::get("/apis/paynotify.dev/v1alpha1/paymentnotifyroutes")
        .header("accept", "application/json;as=Table;g=meta.k8s.io;v=v1")
        .body(Vec::new())
        .unwrap();
    let table: Value = client.request(request).await.unwrap();
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Name", "Provider", "Path", "Ready", "Age"]);
    let rows: Vec<Vec<Value>> = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cells"].as_array().unwrap().clone())
        .filter(|cells| cells[0].as_str().is_some_and(|n| n.starts_with("demo-")))
        .collect();
    assert!(
        rows.contains(&vec![
            json!("demo-wechatpay-v3"),
            json!("wechatpay-v3"),
            json!("/notify/demo/wechatpay-v3"),
            json!("True"),
            rows[0][4].clone()
        ]),
        "{rows:?}"
    );
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn rotation_with_both_platform_certificates_listed_verifies_both() {
    let client = client().await;
    let ns = control_plane::unique_namespace("rotate").await;
    let (old, new) = (
        PlatformKey::generate().unwrap(),
        PlatformKey::generate().unwrap(),
    );
    let (old_cert, new_cert) = (
        old.certificate(&[0x0A, 0x01]).unwrap(),
        new.certificate(&[0x0B, 0x02]).unwrap(),
    );
    let api_v3_key = *b"0123456789abcdef0123456789abcdef";
    put_secret(
        &client,
        &ns,
        "webhook",
        &[("secret", WEBHOOK_SECRET.as_bytes())],
    )
    .await;
    put_secret(
        &client,
        &ns,
        "wechat",
        &[
            ("api_v3_key", &api_v3_key),
            ("old.pem", old_cert.as_bytes()),
            ("new.pem", new_cert.as_bytes()),
        ],
    )
    .await;
    let route = |certs: &[&str]| {
        json!({
            "apiVersion": "paynotify.dev/v1alpha1", "kind": "PaymentNotifyRoute", "metadata": {"name": "v3"},
            "spec": {
                "path": "/notify/v3",
                "provider": {"wechatPayV3": {"mchId": "1900000001",
                    "apiV3Key": {"secretKeyRef": {"name": "wechat", "key": "api_v3_key"}},
                    "platformCertificates": certs.iter().map(|c| json!({"secretKeyRef": {"name": "wechat", "key": c}})).collect::<Vec<_>>()}},
                "targets": [{"log": {}}],
                "signing": {"secret": {"secretKeyRef": {"name": "webhook", "key": "secret"}}}
            }
        })
    };
    create_route(&client, &ns, &route(&["old.pem"]))
        .await
        .unwrap();
    let ctl = RunningController::start(&client, &ns, "controller-0");
    let (ingress, follow) = start_ingress(&client, &ns);
    wait("first table", Duration::from_secs(30), || async {
        ingress.is_ready().then_some(())
    })
    .await;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let post = |key: &PlatformKey, serial: &str, order: &str| {
        let (headers, body) = support::wechat_v3_request(
            key,
            serial,
            &api_v3_key,
            &support::v3_transaction("1900000001", order),
            "TRANSACTION.SUCCESS",
            now(),
        );
        let router = ingress.router();
        async move { support::send(&router, "/notify/v3", &headers, body).await.0 }
    };
    assert_eq!(post(&old, "0A01", "R-1").await, 204);
    assert_eq!(
        post(&new, "0B02", "R-2").await,
        400,
        "the new certificate is not configured yet"
    );

    // Both listed: both verify.
    let routes: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &ApiResource::erase::<PaymentNotifyRoute>(&()),
    );
    let generation = ingress.table().generation;
    routes
        .patch(
            "v3",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": route(&["old.pem", "new.pem"])["spec"]})),
        )
        .await
        .unwrap();
    wait(
        "table with both certificates",
        Duration::from_secs(30),
        || async { (ingress.table().generation > generation).then_some(()) },
    )
    .await;
    assert_eq!(post(&old, "0A01", "R-3").await, 204);
    assert_eq!(post(&new, "0B02", "R-4").await, 204);

    // The old one removed: only the new one verifies.
    let generation = ingress.table().generation;
    routes
        .patch(
            "v3",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": route(&["new.pem"])["spec"]})),
        )
        .await
        .unwrap();
    wait(
        "table with the new certificate",
        Duration::from_secs(30),
        || async { (ingress.table().generation > generation).then_some(()) },
    )
    .await;
    assert_eq!(post(&old, "0A01", "R-5").await, 400);
    assert_eq!(post(&new, "0B02", "R-6").await, 204);
    follow.abort();
    ctl.stop().await.unwrap();
}

/// A child process killed (SIGKILL) when dropped.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_binary(args: &[&str], log: &std::path::Path) -> Process {
    let log = std::fs::File::create(log).unwrap();
    Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_paynotify"))
            .args(args)
            .env("KUBECONFIG", control_plane::kubeconfig_path())
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    Some((resp.status().as_u16(), resp.text().await.ok()?))
}

#[tokio::test]
async fn end_to_end_with_the_real_binaries_and_an_sdk_signed_notification() {
    let client = client().await;
    let ns = control_plane::unique_namespace("binaries").await;
    let fixtures = support::fixtures_dir();
    let case: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("cases/alipay/alipay_rsa2_payment_success.json"))
            .unwrap(),
    )
    .unwrap();
    assert!(
        case["signedBy"]
            .as_str()
            .unwrap()
            .starts_with("python-alipay-sdk")
    );
    let public_key = std::fs::read(fixtures.join("keys/alipay_public_key.txt")).unwrap();
    put_secret(
        &client,
        &ns,
        "alipay",
        &[("alipay_public_key", &public_key)],
    )
    .await;
    put_secret(
        &client,
        &ns,
        "webhook",
        &[("secret", WEBHOOK_SECRET.as_bytes())],
    )
    .await;
    let downstream = Downstream::start().await;
    create_route(
        &client,
        &ns,
        &alipay_route(
            "sdk",
            "/notify/sdk",
            "alipay",
            json!({"url": downstream.url}),
        ),
    )
    .await
    .unwrap();

    let logs = std::env::temp_dir().join(format!("paynotify-e2e-{ns}"));
    std::fs::create_dir_all(&logs).unwrap();
    let controller = |identity: &str, admin: u16| {
        spawn_binary(
            &[
                "controller",
                "--namespace",
                &ns,
                "--watch-namespaces",
                &ns,
                "--identity",
                identity,
                "--lease-seconds",
                "3",
                "--admin-listen",
                &format!("127.0.0.1:{admin}"),
            ],
            &logs.join(format!("{identity}.log")),
        )
    };
    let (admin0, admin1) = (free_port(), free_port());
    let mut controllers = vec![
        (controller("controller-0", admin0), admin0),
        (controller("controller-1", admin1), admin1),
    ];
    let (port, ingress_admin) = (free_port(), free_port());
    let _ingress = spawn_binary(
        &[
            "ingress",
            "--namespace",
            &ns,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{ingress_admin}"),
        ],
        &logs.join("ingress.log"),
    );
    wait_condition(&client, &ns, "sdk", "Ready", "True", "Ready").await;
    wait("ingress ready", Duration::from_secs(30), || async {
        (http_get(ingress_admin, "/readyz").await?.0 == 200).then_some(())
    })
    .await;

    // The SDK-signed notification: success for the platform, a signed event downstream.
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/notify/sdk"))
        .header(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )
        .body(case["request"]["body"].as_str().unwrap().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        (resp.status().as_u16(), resp.text().await.unwrap()),
        (200, "success".to_string())
    );
    let delivered = downstream.take();
    assert_eq!(delivered.len(), 1);
    let event = support::check_webhook(&delivered[0], WEBHOOK_SECRET);
    assert_eq!(event["orderId"], case["expect"]["orderId"]);
    assert_eq!(event["amount"]["value"], case["expect"]["amount"]);

    // Kill the leader outright: the other process takes over once the Lease expires.
    let metric = |admin: u16| async move {
        let (_, text) = http_get(admin, "/metrics").await?;
        Some(text.lines().any(|l| l == "paynotify_controller_leader 1"))
    };
    let leader = wait("a leader", Duration::from_secs(20), || async {
        for (i, (_, admin)) in controllers.iter().enumerate() {
            if metric(*admin).await == Some(true) {
                return Some(i);
            }
        }
        None
    })
    .await;
    let (killed, _) = controllers.remove(leader);
    drop(killed);
    let (_, survivor) = &controllers[0];
    wait("the survivor leads", Duration::from_secs(30), || async {
        metric(*survivor).await.filter(|l| *l)
    })
    .await;
    create_route(
        &client,
        &ns,
        &alipay_route(
            "later",
            "/notify/later",
            "alipay",
            json!({"url": downstream.url}),
        ),
    )
    .await
    .unwrap();
    wait_condition(&client, &ns, "later", "Ready", "True", "Ready").await;

    // Deleting a route: its path is no longer served.
    let routes: Api<PaymentNotifyRoute> = Api::namespaced(client.clone(), &ns);
    routes
        .delete("sdk", &DeleteParams::default())
        .await
        .unwrap();
    wait(
        "404 for the deleted route",
        Duration::from_secs(30),
        || async {
            let resp = reqwest::Client::new()
                .post(format!("http://127.0.0.1:{port}/notify/sdk"))
                .body("x")
                .send()
                .await
                .ok()?;
            (resp.status().as_u16() == 404).then_some(())
        },
    )
    .await;
    let _ = std::fs::remove_dir_all(&logs);
}
