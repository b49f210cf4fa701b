//! The verifying ingress: one HTTP handler for every route's callback path, plus the admin
//! listener (`/healthz`, `/readyz`, `/metrics`). `serve` and the cluster ingress share it.

pub mod cluster;
mod handler;
pub mod metrics;
pub mod server;

use crate::delivery::Forwarder;
use crate::delivery::dedup::Dedup;
use crate::table::RoutingTable;
use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics::Metrics;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Per-request limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body read; larger requests get 413.
    pub max_body_bytes: usize,
    /// Longest a request may take, body read included.
    pub request_timeout: Duration,
}

/// The wall clock, in unix seconds; replaceable so tests can replay captured requests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default()
    })
}

/// Shared state of the ingress.
pub struct Ingress {
    table: ArcSwap<RoutingTable>,
    /// Exported metrics.
    pub metrics: Metrics,
    dedup: Dedup,
    pub(crate) forwarder: Forwarder,
    queue: std::sync::OnceLock<crate::delivery::queue::Queue>,
    limits: Limits,
    clock: Clock,
    ready: AtomicBool,
    draining: AtomicBool,
    replay_endpoint: AtomicBool,
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Ingress {
    /// An ingress with no routes yet (not ready until the first table is installed).
    pub fn new(limits: Limits, dedup: Dedup, forwarder: Forwarder, clock: Clock) -> Arc<Self> {
        Arc::new(Ingress {
            table: ArcSwap::from_pointee(RoutingTable::default()),
            metrics: Metrics::new(),
            dedup,
            forwarder,
            queue: std::sync::OnceLock::new(),
            limits,
            clock,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            replay_endpoint: AtomicBool::new(false),
        })
    }

    /// Attaches the durable queue that Queued routes store into (once, before serving).
    pub fn attach_queue(&self, queue: crate::delivery::queue::Queue) {
        let _ = self.queue.set(queue);
    }

    /// The durable queue, if one is attached.
    pub fn queue(&self) -> Option<&crate::delivery::queue::Queue> {
        self.queue.get()
    }

    /// Installs a new table atomically: requests already running finish with the old one.
    pub fn install(&self, table: RoutingTable) {
        // Rebuilt from scratch: a rotated-out certificate must stop alerting.
        self.metrics.certificate_not_after.reset();
        for route in table.routes() {
            let targets: Vec<&str> = route.targets.iter().map(|t| t.label()).collect();
            let kind = route.adapter.kind();
            self.metrics.declare_route(&route.name, kind, &targets);
            for (serial, not_after) in route.adapter.certificates() {
                self.metrics
                    .certificate_not_after
                    .with_label_values(&[&route.name, kind.as_str(), &serial])
                    .set(not_after);
            }
        }
        self.metrics.table_generation.set(table.generation as i64);
        self.metrics.table_routes.set(table.len() as i64);
        self.table.store(Arc::new(table));
        self.ready.store(true, Ordering::SeqCst);
    }

    /// The table being served.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Serves `POST /replay` on the admin listener (off unless configured).
    pub fn enable_replay_endpoint(&self) {
        self.replay_endpoint.store(true, Ordering::SeqCst);
    }

    /// Marks the ingress as shutting down: `/readyz` fails so load balancers move away.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// True once a first table is installed.
    pub fn is_loaded(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// True once a table is installed and until draining starts.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }

    /// The router for platform callbacks: every path goes to the notification handler.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .fallback(handler::notify)
            .with_state(self.clone())
    }

    /// The admin router: health, readiness and metrics.
    pub fn admin_router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .route("/replay", axum::routing::post(replay))
            .with_state(self.clone())
    }
}

async fn readyz(State(ingress): State<Arc<Ingress>>) -> (StatusCode, &'static str) {
    if ingress.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// A replay request: event ids, or a route and a time range (RFC 3339).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReplayRequest {
    #[serde(default)]
    ids: Vec<String>,
    route: Option<String>,
    since: Option<String>,
    until: Option<String>,
    #[serde(default)]
    include_delivered: bool,
}

async fn replay(
    State(ingress): State<Arc<Ingress>>,
    axum::Json(request): axum::Json<ReplayRequest>,
) -> (StatusCode, String) {
    if !ingress.replay_endpoint.load(Ordering::SeqCst) {
        return (
            StatusCode::NOT_FOUND,
            "replay is disabled (admin.replay)\n".into(),
        );
    }
    let Some(queue) = ingress.queue() else {
        return (
            StatusCode::CONFLICT,
            "no store: no route is Queued\n".into(),
        );
    };
    let selector = match crate::delivery::store::Selector::parse(
        request.ids,
        request.route,
        request.since.as_deref(),
        request.until.as_deref(),
        request.include_delivered,
    ) {
        Ok(s) => s,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    match crate::delivery::queue::replay(&ingress, queue, selector).await {
        Ok(n) => (
            StatusCode::OK,
            serde_json::json!({"requeued": n}).to_string(),
        ),
        Err(e @ crate::delivery::store::StoreError::Request(_)) => {
            (StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

async fn metrics_text(
    State(ingress): State<Arc<Ingress>>,
) -> ([(http::HeaderName, &'static str); 1], String) {
    ingress
        .metrics
        .dedup_entries
        .set(ingress.dedup.len() as i64);
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ingress.metrics.render(),
    )
}
