//! `paynotify controller`: watches `PaymentNotifyRoute`s and the Secrets they name, writes
//! each route's status, and publishes the compiled routing table as one Secret for the
//! ingress. The pipeline per route is Stackable's: dereference (fetch the Secrets) →
//! validate and build ([`evaluate`], pure) → apply (status, events) — and the publisher
//! turns every ready route into the table. Only the holder of the Lease does any of it.

pub mod evaluate;
pub mod metrics;
pub mod publish;
pub mod status;

use crate::crd::PaymentNotifyRoute;
use crate::table::ResolvedRoute;
use axum::Router;
use axum::routing::get;
use evaluate::{Environment, Evaluation, SecretData};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerSettings, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use metrics::ControllerMetrics;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// The field manager of every server-side apply the controller makes.
pub const FIELD_MANAGER: &str = "paynotify-controller";
/// A route is re-evaluated at least this often (certificate expiry, missed events).
const RESYNC: Duration = Duration::from_secs(300);
/// Longest wait after repeated failures of one route.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The operator's namespace: the Lease and the table Secret live here.
    pub namespace: String,
    /// Namespaces whose routes are served; empty means all.
    pub watch_namespaces: Vec<String>,
    /// Name of the table Secret.
    pub table_secret: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's identity in the Lease (the Pod name).
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub lease_duration: Duration,
    /// The cluster DNS domain, for Service targets.
    pub cluster_domain: String,
    /// Public base URL of the ingress, to show each route's callback URL.
    pub public_base_url: Option<String>,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub admin_listen: SocketAddr,
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The admin listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        source: std::io::Error,
    },
    /// Leader election failed.
    #[error("leader election: {0}")]
    Lease(String),
    /// Another replica took the Lease: exiting is the safe thing, the Pod restarts as standby.
    #[error("lost the leader lease")]
    LeaseLost,
}

/// Why one reconcile failed (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Reading a Secret failed.
    #[error("reading Secret {name}: {source}")]
    SecretRead {
        /// The Secret.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("writing status: {0}")]
    StatusWrite(#[source] kube::Error),
    /// The status did not serialize.
    #[error("encoding status: {0}")]
    Encode(#[from] serde_json::Error),
}

impl ReconcileError {
    /// The bounded metric label.
    fn reason(&self) -> &'static str {
        match self {
            ReconcileError::SecretRead { .. } => "secret_read",
            ReconcileError::StatusWrite(_) => "status_write",
            ReconcileError::Encode(_) => "encode",
        }
    }
}

struct Context {
    client: Client,
    config: ControllerConfig,
    env: Environment,
    stores: Vec<Store<PaymentNotifyRoute>>,
    evaluations: Mutex<HashMap<String, Evaluation>>,
    failures: Mutex<HashMap<String, u32>>,
    publish: Notify,
    metrics: Arc<ControllerMetrics>,
    recorder: Recorder,
}

impl Context {
    fn all_routes(&self) -> Vec<Arc<PaymentNotifyRoute>> {
        self.stores.iter().flat_map(|s| s.state()).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps stay consistent even if a holder panicked; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the controller until `shutdown` resolves (Ok) or the Lease is lost (Err).
pub async fn run(
    client: Client,
    config: ControllerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ControllerError> {
    let metrics = Arc::new(ControllerMetrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| ControllerError::Admin {
            addr: config.admin_listen,
            source,
        })?;
    let admin = admin_router(metrics.clone(), ready.clone());
    let admin_task = tokio::spawn(async move {
        let _ = axum::serve(listener, admin).await;
    });
    let result = run_elected(client, config, metrics, ready, shutdown).await;
    admin_task.abort();
    result
}

fn admin_router(metrics: Arc<ControllerMetrics>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::SeqCst);
                async move {
                    if ready {
                        (http::StatusCode::OK, "ready")
                    } else {
                        (http::StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.render();
                async move { text }
            }),
        )
}

async fn run_elected(
    client: Client,
    config: ControllerConfig,
    metrics: Arc<ControllerMetrics>,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ControllerError> {
    let lease = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_field_manager(FIELD_MANAGER)
        .with_duration(config.lease_duration.as_secs().max(2))
        .with_grace(1)
        .build()
        .await
        .map_err(|e| ControllerError::Lease(e.to_string()))?;
    let (mut leader, lease_task) = lease.watch().await;
    // A standby replica is healthy and ready: it is waiting for the Lease, as it should.
    ready.store(true, Ordering::SeqCst);
    tokio::pin!(shutdown);
    let outcome = loop {
        if *leader.borrow_and_update() {
            tracing::info!(identity = %config.identity, "acquired the leader lease");
            metrics.leader.set(1);
            let work = lead(client.clone(), config.clone(), metrics.clone());
            tokio::pin!(work);
            break loop {
                tokio::select! {
                    _ = &mut shutdown => break Ok(()),
                    changed = leader.changed() => {
                        if changed.is_err() || !*leader.borrow_and_update() {
                            tracing::error!("lost the leader lease; exiting");
                            break Err(ControllerError::LeaseLost);
                        }
                    }
                    () = &mut work => break Ok(()),
                }
            };
        }
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            changed = leader.changed() => {
                if changed.is_err() {
                    break Err(ControllerError::Lease("the lease watcher stopped".into()));
                }
            }
        }
    };
    metrics.leader.set(0);
    // Closing the channel makes the lease manager release the Lease for the next replica.
    drop(leader);
    let _ = lease_task.await;
    outcome
}

/// The leader's work: one kube Controller per watched scope, and the publisher.
async fn lead(client: Client, config: ControllerConfig, metrics: Arc<ControllerMetrics>) {
    let scopes: Vec<(Api<PaymentNotifyRoute>, Api<Secret>)> = if config.watch_namespaces.is_empty()
    {
        vec![(Api::all(client.clone()), Api::all(client.clone()))]
    } else {
        config
            .watch_namespaces
            .iter()
            .map(|ns| {
                (
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced(client.clone(), ns),
                )
            })
            .collect()
    };
    let mut controllers = Vec::new();
    let mut stores = Vec::new();
    for (routes, secrets) in scopes {
        let controller = Controller::new(routes.clone(), watcher::Config::default().any_semantic());
        let store = controller.store();
        stores.push(store.clone());
        let by_secret = store.clone();
        let by_path = store.clone();
        controllers.push(
            controller
                // A Secret change re-reconciles only the routes that name it.
                .watches(
                    secrets,
                    watcher::Config::default(),
                    move |secret: Secret| routes_using_secret(&by_secret, &secret),
                )
                // A route appearing or going away changes who owns its path.
                .watches(
                    routes,
                    watcher::Config::default(),
                    move |route: PaymentNotifyRoute| routes_sharing_path(&by_path, &route),
                )
                .with_config(ControllerSettings::default().concurrency(4)),
        );
    }
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: Some(config.identity.clone()),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        env: Environment {
            cluster_domain: config.cluster_domain.clone(),
        },
        client,
        config,
        stores,
        evaluations: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
        publish: Notify::new(),
        metrics,
    });
    let publisher = tokio::spawn(publish_loop(ctx.clone()));
    let runs = controllers.into_iter().map(|c| {
        c.run(reconcile, error_policy, ctx.clone())
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "controller event");
                }
            })
    });
    futures_util::future::join_all(runs).await;
    publisher.abort();
}

fn routes_using_secret(
    store: &Store<PaymentNotifyRoute>,
    secret: &Secret,
) -> Vec<ObjectRef<PaymentNotifyRoute>> {
    let (ns, name) = (secret.namespace(), secret.name_any());
    store
        .state()
        .iter()
        .filter(|r| r.namespace() == ns && evaluate::referenced_secrets(&r.spec).contains(&name))
        .map(|r| ObjectRef::from_obj(r.as_ref()))
        .collect()
}

fn routes_sharing_path(
    store: &Store<PaymentNotifyRoute>,
    route: &PaymentNotifyRoute,
) -> Vec<ObjectRef<PaymentNotifyRoute>> {
    store
        .state()
        .iter()
        .filter(|r| r.spec.path == route.spec.path && r.metadata.uid != route.metadata.uid)
        .map(|r| ObjectRef::from_obj(r.as_ref()))
        .collect()
}

async fn reconcile(
    route: Arc<PaymentNotifyRoute>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let timer = ctx
        .metrics
        .reconcile_duration
        .with_label_values(&[] as &[&str])
        .start_timer();
    let result = reconcile_route(&route, &ctx).await;
    timer.observe_duration();
    let key = evaluate::route_key(&route);
    ctx.metrics
        .route_reconciles
        .with_label_values(&[&key])
        .inc();
    match &result {
        Ok(_) => {
            ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
            lock(&ctx.failures).remove(&key);
        }
        Err(e) => {
            ctx.metrics.reconciles.with_label_values(&["error"]).inc();
            ctx.metrics
                .reconcile_errors
                .with_label_values(&[e.reason()])
                .inc();
        }
    }
    result
}

async fn reconcile_route(
    route: &PaymentNotifyRoute,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let ns = route.namespace().unwrap_or_default();
    // Dereference: the Secrets the route names, in its own namespace only.
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut secrets = SecretData::new();
    for name in evaluate::referenced_secrets(&route.spec) {
        let secret =
            secrets_api
                .get_opt(&name)
                .await
                .map_err(|source| ReconcileError::SecretRead {
                    name: name.clone(),
                    source,
                })?;
        let data = secret.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        });
        secrets.insert(name, data);
    }
    // Validate and build.
    let all = ctx.all_routes();
    let refs: Vec<&PaymentNotifyRoute> = all.iter().map(Arc::as_ref).collect();
    let eval = evaluate::evaluate(route, &secrets, &refs, &ctx.env);
    // Apply: status and events, only when something changed.
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let new_status = status::build(
        route.status.as_ref(),
        &eval,
        route.metadata.generation,
        &route.spec.path,
        ctx.config.public_base_url.as_deref(),
        &now,
    );
    if route.status.as_ref() != Some(&new_status) {
        let api: Api<PaymentNotifyRoute> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({
            "apiVersion": PaymentNotifyRoute::api_version(&()),
            "kind": PaymentNotifyRoute::kind(&()),
            "status": new_status,
        });
        api.patch_status(
            &route.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(ReconcileError::StatusWrite)?;
        for condition in status::transitions(route.status.as_ref(), &new_status) {
            let event = Event {
                type_: if condition.status == "True" {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: condition.reason.clone(),
                note: Some(format!(
                    "{} is {}: {}",
                    condition.type_, condition.status, condition.message
                )),
                action: "Reconcile".into(),
                secondary: None,
            };
            let reference: ObjectReference = route.object_ref(&());
            if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, "could not record an event");
            }
        }
    }
    tracing::debug!(route = %eval.key, ready = eval.ready(), "reconciled");
    lock(&ctx.evaluations).insert(eval.key.clone(), eval);
    ctx.publish.notify_one();
    Ok(Action::requeue(RESYNC))
}

fn error_policy(
    route: Arc<PaymentNotifyRoute>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    let key = evaluate::route_key(&route);
    let failures = {
        let mut map = lock(&ctx.failures);
        let n = map.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(failures);
    tracing::warn!(route = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Capped exponential backoff: 1 s, 2 s, 4 s … up to [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64
        .checked_shl(failures.saturating_sub(1).min(16))
        .unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

/// Publishes the table whenever evaluations change, once every known route has one.
async fn publish_loop(ctx: Arc<Context>) {
    for store in &ctx.stores {
        // kube's readiness signal wakes only its latest waiter, and the controller waits on
        // it too: poll it instead of parking on it.
        while tokio::time::timeout(Duration::from_millis(200), store.wait_until_ready())
            .await
            .is_err()
        {}
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let mut current = match secrets.get_opt(&ctx.config.table_secret).await {
        Ok(Some(secret)) => publish::read_table(&secret).ok(),
        _ => None,
    };
    if let Some(doc) = &current {
        ctx.metrics.table_generation.set(doc.generation as i64);
    }
    loop {
        tokio::select! {
            () = ctx.publish.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        // Let a burst of reconciles settle into one write.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(routes) = ready_routes(&ctx) else {
            continue;
        };
        let Some(next) = publish::next_document(current.as_ref(), routes) else {
            continue;
        };
        let secret =
            match publish::table_secret(&ctx.config.table_secret, &ctx.config.namespace, &next) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode the routing table");
                    continue;
                }
            };
        match secrets
            .patch(
                &ctx.config.table_secret,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(
                    generation = next.generation,
                    routes = next.routes.len(),
                    "published the routing table"
                );
                ctx.metrics.table_generation.set(next.generation as i64);
                current = Some(next);
            }
            Err(e) => {
                ctx.metrics
                    .table_write_errors
                    .with_label_values(&[] as &[&str])
                    .inc();
                tracing::error!(error = %e, "cannot write the routing table; retrying");
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    ctx.publish.notify_one();
                });
            }
        }
    }
}

/// The routes to publish, or `None` while some route has not been evaluated yet (so a
/// starting controller never publishes a partial table).
fn ready_routes(ctx: &Context) -> Option<Vec<ResolvedRoute>> {
    let routes = ctx.all_routes();
    let mut evaluations = lock(&ctx.evaluations);
    let keys: Vec<String> = routes.iter().map(|r| evaluate::route_key(r)).collect();
    if keys.iter().any(|k| !evaluations.contains_key(k)) {
        return None;
    }
    evaluations.retain(|k, _| {
        let exists = keys.contains(k);
        if !exists {
            let _ = ctx.metrics.route_reconciles.remove_label_values(&[k]);
        }
        exists
    });
    ctx.metrics.routes.reset();
    for eval in evaluations.values() {
        for c in &eval.conditions {
            ctx.metrics
                .routes
                .with_label_values(&[c.type_, if c.ok { "True" } else { "False" }])
                .inc();
        }
    }
    // Evaluations made at different moments could both claim a path; the owner rule decides.
    let refs: Vec<&PaymentNotifyRoute> = routes.iter().map(Arc::as_ref).collect();
    let published = routes
        .iter()
        .filter(|r| {
            evaluate::path_owner(&r.spec.path, &refs)
                .is_some_and(|o| o.metadata.uid == r.metadata.uid)
        })
        .filter_map(|r| {
            evaluations
                .get(&evaluate::route_key(r))
                .and_then(|e| e.resolved.clone())
        })
        .collect();
    Some(published)
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(20), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }
}
