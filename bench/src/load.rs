//! The open-loop load generator. Requests are scheduled at a fixed rate whatever the server
//! does, and each latency is measured from the request's *intended* send time, so a server
//! that stalls is charged for every request that queued behind the stall (no coordinated
//! omission).

use crate::Error;
use crate::corpus::{Notification, is_success};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// A request that has no answer after this long counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many requests in flight; beyond it the scheduler waits, and the wait is
/// part of the measured latency.
const MAX_IN_FLIGHT: usize = 512;

/// What one fixed-rate run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Target rate.
    pub rate: f64,
    /// Requests answered with the platform's success answer.
    pub ok: u64,
    /// Requests that failed, timed out or got another answer.
    pub errors: u64,
    /// Wall time from the first intended send to the last answer.
    pub elapsed: Duration,
    /// Latency from intended send to answer, microseconds.
    pub latency: Histogram<u64>,
    /// How busy the load generator's core was (filled in by the runner).
    pub client_core_busy: f64,
}

impl LoadResult {
    /// Latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// Sustained: no errors, p99 under the limit, and the schedule was kept.
    pub fn sustainable(&self, p99_limit_ms: f64) -> bool {
        let achieved = self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9);
        self.errors == 0 && self.ms(0.99) < p99_limit_ms && achieved >= 0.9 * self.rate
    }
}

/// Sends `notifications` to `url` at `rate` per second, once each, in order.
pub async fn run(
    url: &str,
    path: &'static str,
    notifications: &[Notification],
    rate: f64,
) -> Result<LoadResult, Error> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .build(connector);
    let uri: http::Uri = format!("{url}{path}").parse()?;
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, n) in notifications.iter().enumerate() {
        let intended = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(intended.into()).await;
        let slot = slots.clone().acquire_owned().await?;
        let mut request = http::Request::post(uri.clone()).body(Full::new(n.body.clone()))?;
        for (k, v) in &n.headers {
            request
                .headers_mut()
                .insert(http::HeaderName::from_bytes(k.as_bytes())?, v.parse()?);
        }
        let (client, histogram, errors) = (client.clone(), histogram.clone(), errors.clone());
        tasks.spawn(async move {
            let answered = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let response = client.request(request).await.ok()?;
                let status = response.status().as_u16();
                let body = response.into_body().collect().await.ok()?.to_bytes();
                Some(is_success(path, status, &body))
            })
            .await;
            let latency = intended.elapsed();
            if answered != Ok(Some(true)) {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if let Ok(mut h) = histogram.lock() {
                let _ = h.record((latency.as_micros() as u64).max(1));
            }
            drop(slot);
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    let latency = histogram.lock().map_err(|_| "histogram poisoned")?.clone();
    let errors = errors.load(std::sync::atomic::Ordering::Relaxed);
    let sent = notifications.len() as u64;
    Ok(LoadResult {
        rate,
        ok: sent - errors,
        errors,
        elapsed,
        latency,
        client_core_busy: 0.0,
    })
}
