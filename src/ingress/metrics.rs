//! The ingress's Prometheus metrics. Labels are bounded: route and target come from the
//! configuration, provider and outcome from fixed sets; never order or event ids.

use crate::provider::{ProviderKind, RejectReason};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// What happened to a notification, as counted in `paynotify_notifications_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Verified and delivered to every target.
    Accepted,
    /// Already delivered before: answered with success, not forwarded again.
    Duplicate,
    /// Verified, but a target failed: the platform was told to retry.
    DeliveryFailed,
    /// The request took longer than the request timeout.
    Timeout,
    /// Queued mode: the store could not take the event; the platform was told to retry.
    StoreUnavailable,
    /// Refused for this reason.
    Rejected(RejectReason),
}

impl Outcome {
    /// The label value.
    pub fn label(self) -> String {
        match self {
            Outcome::Accepted => "accepted".into(),
            Outcome::Duplicate => "duplicate".into(),
            Outcome::DeliveryFailed => "delivery_failed".into(),
            Outcome::Timeout => "timeout".into(),
            Outcome::StoreUnavailable => "store_unavailable".into(),
            Outcome::Rejected(r) => format!("rejected_{}", r.as_str()),
        }
    }
}

/// What happened to one delivery attempt to one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The target answered 2xx.
    Success,
    /// The target answered something else.
    HttpError,
    /// No answer within the route's timeout.
    Timeout,
    /// Connection or protocol error.
    Error,
}

impl DeliveryOutcome {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            DeliveryOutcome::Success => "success",
            DeliveryOutcome::HttpError => "http_error",
            DeliveryOutcome::Timeout => "timeout",
            DeliveryOutcome::Error => "error",
        }
    }
}

/// Every metric the ingress exports.
pub struct Metrics {
    registry: Registry,
    notifications: IntCounterVec,
    ack_duration: HistogramVec,
    verify_duration: HistogramVec,
    deliveries: IntCounterVec,
    delivery_duration: HistogramVec,
    /// Generation of the routing table being served.
    pub table_generation: IntGauge,
    /// Routes in the table being served.
    pub table_routes: IntGauge,
    /// notAfter of every platform certificate in the table, per route and serial.
    pub certificate_not_after: IntGaugeVec,
    /// Successful table reloads.
    pub reloads: IntCounter,
    /// Reloads refused because the new configuration was bad.
    pub reload_errors: IntCounter,
    /// Requests to a path no route serves.
    pub unrouted: IntCounter,
    /// Entries held for deduplication.
    pub dedup_entries: IntGauge,
    /// Entries dropped before their retention ended because the cache was full.
    pub dedup_evictions: IntCounter,
    ack_unrouted: Histogram,
    /// Queued deliveries waiting, per route.
    pub queue_depth: IntGaugeVec,
    /// Age of the oldest waiting event, per route.
    pub queue_oldest_age: GaugeVec,
    /// Dead letters held, per route.
    pub dead_letters: IntGaugeVec,
    /// Deliveries that became dead letters, per route.
    pub dead_lettered: IntCounterVec,
    /// Failed attempts scheduled for a retry, per route.
    pub retries: IntCounterVec,
    /// Deliveries re-queued by a replay, per route (`all` for replays across routes).
    pub replayed: IntCounterVec,
    /// Time to make an event durable.
    pub store_write_duration: Histogram,
    /// Store operations that failed.
    pub store_errors: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

const ACK_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const VERIFY_BUCKETS: [f64; 12] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            // Names are static and unique, so registration cannot fail.
            r.register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                    labels,
                )
                .expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(&registry, IntGauge::new(name, help).expect("valid metric"))
        };
        let counter = |name: &str, help: &str| {
            reg(
                &registry,
                IntCounter::new(name, help).expect("valid metric"),
            )
        };
        let build = reg(
            &registry,
            prometheus::IntGaugeVec::new(
                Opts::new("paynotify_build_info", "Build information."),
                &["version"],
            )
            .expect("valid metric"),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Metrics {
            notifications: counter_vec(
                "paynotify_notifications_total",
                "Notifications received, by route, provider and outcome.",
                &["route", "provider", "outcome"],
            ),
            ack_duration: histogram_vec(
                "paynotify_ack_duration_seconds",
                "Time from request to the platform's answer.",
                &["route", "provider"],
                &ACK_BUCKETS,
            ),
            verify_duration: histogram_vec(
                "paynotify_verify_duration_seconds",
                "Time to parse, authenticate and normalize one notification.",
                &["provider"],
                &VERIFY_BUCKETS,
            ),
            deliveries: counter_vec(
                "paynotify_deliveries_total",
                "Delivery attempts, by route, target and outcome.",
                &["route", "target", "outcome"],
            ),
            delivery_duration: histogram_vec(
                "paynotify_delivery_duration_seconds",
                "Time of one delivery attempt to one target.",
                &["route", "target"],
                &ACK_BUCKETS,
            ),
            table_generation: gauge(
                "paynotify_table_generation",
                "Generation of the routing table being served.",
            ),
            table_routes: gauge(
                "paynotify_table_routes",
                "Routes in the routing table being served.",
            ),
            reloads: counter(
                "paynotify_config_reloads_total",
                "Routing table reloads that took effect.",
            ),
            reload_errors: counter(
                "paynotify_config_reload_errors_total",
                "Routing table reloads refused; the previous table keeps serving.",
            ),
            unrouted: counter(
                "paynotify_unrouted_requests_total",
                "Requests to a path that no route serves.",
            ),
            dedup_entries: gauge(
                "paynotify_dedup_entries",
                "Delivered notifications remembered for deduplication.",
            ),
            dedup_evictions: counter(
                "paynotify_dedup_evictions_total",
                "Deduplication entries dropped early because the cache was full.",
            ),
            ack_unrouted: histogram_vec(
                "paynotify_unrouted_ack_duration_seconds",
                "Time to answer requests that no route serves.",
                &[],
                &ACK_BUCKETS,
            )
            .with_label_values(&[] as &[&str]),
            certificate_not_after: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "paynotify_certificate_not_after_timestamp_seconds",
                        "Expiry (unix seconds) of each platform certificate a route verifies with.",
                    ),
                    &["route", "provider", "serial"],
                )
                .expect("valid metric"),
            ),
            queue_depth: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "paynotify_queue_depth",
                        "Queued deliveries waiting, per route.",
                    ),
                    &["route"],
                )
                .expect("valid metric"),
            ),
            queue_oldest_age: reg(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "paynotify_queue_oldest_age_seconds",
                        "Age of the oldest waiting queued event, per route.",
                    ),
                    &["route"],
                )
                .expect("valid metric"),
            ),
            dead_letters: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "paynotify_dead_letters",
                        "Dead letters held in the store, per route.",
                    ),
                    &["route"],
                )
                .expect("valid metric"),
            ),
            dead_lettered: counter_vec(
                "paynotify_dead_letters_total",
                "Deliveries that became dead letters, per route.",
                &["route"],
            ),
            retries: counter_vec(
                "paynotify_delivery_retries_total",
                "Failed attempts scheduled for a retry.",
                &["route"],
            ),
            replayed: counter_vec(
                "paynotify_replayed_total",
                "Deliveries re-queued by a replay.",
                &["route"],
            ),
            store_write_duration: histogram_vec(
                "paynotify_store_write_duration_seconds",
                "Time to make one event durable (group commit included).",
                &[],
                &ACK_BUCKETS,
            )
            .with_label_values(&[] as &[&str]),
            store_errors: counter(
                "paynotify_store_errors_total",
                "Store operations that failed.",
            ),
            registry,
        }
    }

    /// Counts one notification.
    pub fn notification(
        &self,
        route: &str,
        provider: ProviderKind,
        outcome: Outcome,
        ack_seconds: f64,
    ) {
        self.notifications
            .with_label_values(&[route, provider.as_str(), &outcome.label()])
            .inc();
        self.ack_duration
            .with_label_values(&[route, provider.as_str()])
            .observe(ack_seconds);
    }

    /// Records one verification's duration.
    pub fn verified(&self, provider: ProviderKind, seconds: f64) {
        self.verify_duration
            .with_label_values(&[provider.as_str()])
            .observe(seconds);
    }

    /// Counts one delivery attempt.
    pub fn delivery(&self, route: &str, target: &str, outcome: DeliveryOutcome, seconds: f64) {
        self.deliveries
            .with_label_values(&[route, target, outcome.label()])
            .inc();
        self.delivery_duration
            .with_label_values(&[route, target])
            .observe(seconds);
    }

    /// Counts a request no route serves.
    pub fn unrouted(&self, seconds: f64) {
        self.unrouted.inc();
        self.ack_unrouted.observe(seconds);
    }

    /// Creates the series of a route at zero, so alerts see it before its first request.
    pub fn declare_route(&self, route: &str, provider: ProviderKind, targets: &[&str]) {
        for outcome in [
            Outcome::Accepted,
            Outcome::Duplicate,
            Outcome::DeliveryFailed,
            Outcome::Timeout,
        ]
        .into_iter()
        .chain(RejectReason::ALL.into_iter().map(Outcome::Rejected))
        {
            self.notifications
                .with_label_values(&[route, provider.as_str(), &outcome.label()]);
        }
        for target in targets {
            for outcome in [
                DeliveryOutcome::Success,
                DeliveryOutcome::HttpError,
                DeliveryOutcome::Timeout,
                DeliveryOutcome::Error,
            ] {
                self.deliveries
                    .with_label_values(&[route, target, outcome.label()]);
            }
        }
    }

    /// The current value of `paynotify_notifications_total` for one series (for tests).
    pub fn notification_count(&self, route: &str, provider: ProviderKind, outcome: Outcome) -> u64 {
        self.notifications
            .with_label_values(&[route, provider.as_str(), &outcome.label()])
            .get()
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
