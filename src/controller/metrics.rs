//! The controller's Prometheus metrics.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric the controller exports.
pub struct ControllerMetrics {
    registry: Registry,
    /// Reconciles by result (`ok`, `error`).
    pub reconciles: IntCounterVec,
    /// Reconcile errors by reason.
    pub reconcile_errors: IntCounterVec,
    /// Reconciles by route (`namespace/name`; bounded by the routes that exist).
    pub route_reconciles: IntCounterVec,
    /// Reconcile duration.
    pub reconcile_duration: HistogramVec,
    /// Routes by condition type and status.
    pub routes: IntGaugeVec,
    /// Generation of the published routing table.
    pub table_generation: IntGauge,
    /// Table writes that failed.
    pub table_write_errors: IntCounterVec,
    /// 1 while this replica holds the lease.
    pub leader: IntGauge,
}

impl ControllerMetrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            // Names are static and unique, so registration cannot fail.
            r.register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        ControllerMetrics {
            reconciles: counter(
                "paynotify_controller_reconciles_total",
                "Route reconciles, by result.",
                &["result"],
            ),
            reconcile_errors: counter(
                "paynotify_controller_reconcile_errors_total",
                "Route reconciles that failed, by reason.",
                &["reason"],
            ),
            route_reconciles: counter(
                "paynotify_controller_route_reconciles_total",
                "Reconciles by route.",
                &["route"],
            ),
            reconcile_duration: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "paynotify_controller_reconcile_duration_seconds",
                        "Time of one route reconcile.",
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ]),
                    &[],
                )
                .expect("valid metric"),
            ),
            routes: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "paynotify_controller_routes",
                        "Routes by condition type and status.",
                    ),
                    &["condition", "status"],
                )
                .expect("valid metric"),
            ),
            table_generation: reg(
                &registry,
                IntGauge::new(
                    "paynotify_controller_table_generation",
                    "Generation of the published routing table.",
                )
                .expect("valid metric"),
            ),
            table_write_errors: counter(
                "paynotify_controller_table_write_errors_total",
                "Routing table writes that failed.",
                &[],
            ),
            leader: reg(
                &registry,
                IntGauge::new(
                    "paynotify_controller_leader",
                    "1 while this replica holds the leader lease.",
                )
                .expect("valid metric"),
            ),
            registry,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}
