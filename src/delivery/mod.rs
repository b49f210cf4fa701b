//! Delivery downstream: Standard Webhooks-signed POSTs to every target of a route, and the
//! deduplication cache in front of them.

pub mod dedup;
pub mod jetstream;
pub mod queue;
pub mod retry;
pub mod store;

use crate::event::PaymentEvent;
use crate::ingress::metrics::{DeliveryOutcome, Metrics};
use crate::table::{Route, Target};
use bytes::Bytes;
use futures_util::future::join_all;
use std::time::Instant;

/// Why a delivery did not reach every target.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The event could not be encoded.
    #[error("cannot encode event: {0}")]
    Encode(#[from] serde_json::Error),
    /// One or more targets did not answer 2xx.
    #[error("{failed} of {total} targets failed")]
    Targets {
        /// Targets that failed.
        failed: usize,
        /// Targets in the route.
        total: usize,
    },
}

/// Sends events to targets over HTTP.
#[derive(Clone)]
pub struct Forwarder {
    client: reqwest::Client,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Forwarder")
    }
}

impl Forwarder {
    /// A forwarder with pooled connections; redirects are not followed, since a 3xx from a
    /// target is a misconfiguration, not a delivery.
    pub fn new() -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("paynotify/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .build()?;
        Ok(Forwarder { client })
    }

    /// Delivers `event` to every target of `route` at once; Ok only when all answered 2xx.
    pub async fn deliver(
        &self,
        route: &Route,
        event: &PaymentEvent,
        now_unix: i64,
        metrics: &Metrics,
    ) -> Result<(), DeliveryError> {
        let body = Bytes::from(serde_json::to_vec(event)?);
        let attempts = route
            .targets
            .iter()
            .map(|target| self.send(route, target, &event.id, &body, now_unix, metrics));
        let results = join_all(attempts).await;
        let failed = results.iter().filter(|a| !a.delivered()).count();
        if failed == 0 {
            Ok(())
        } else {
            Err(DeliveryError::Targets {
                failed,
                total: results.len(),
            })
        }
    }

    /// One signed POST of `body` to `target`, counted in the metrics.
    pub async fn send(
        &self,
        route: &Route,
        target: &Target,
        id: &str,
        body: &Bytes,
        now_unix: i64,
        metrics: &Metrics,
    ) -> Attempt {
        let start = Instant::now();
        let mut attempt = match target {
            Target::Log => {
                tracing::info!(route = %route.name, event = %String::from_utf8_lossy(body), "delivered event (log target)");
                Attempt {
                    status: Some(200),
                    ..Attempt::default()
                }
            }
            Target::Url(url) => {
                let sent = self
                    .client
                    .post(url.clone())
                    .timeout(route.timeout)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header("webhook-id", id)
                    .header("webhook-timestamp", now_unix.to_string())
                    .header("webhook-signature", route.signing.sign(id, now_unix, body))
                    .body(body.clone())
                    .send()
                    .await;
                match sent {
                    Ok(response) => read_answer(response, route.timeout).await,
                    Err(e) => Attempt {
                        timed_out: e.is_timeout(),
                        error: Some(e.to_string()),
                        ..Attempt::default()
                    },
                }
            }
        };
        attempt.latency = start.elapsed();
        let outcome = attempt.outcome();
        metrics.delivery(
            &route.name,
            target.label(),
            outcome,
            attempt.latency.as_secs_f64(),
        );
        if outcome != DeliveryOutcome::Success {
            tracing::warn!(route = %route.name, target = target.label(), event_id = %id, outcome = outcome.label(), "delivery attempt failed");
        }
        attempt
    }
}

/// What one attempt got.
#[derive(Debug, Clone, Default)]
pub struct Attempt {
    /// HTTP status, if the target answered.
    pub status: Option<u16>,
    /// Whether the attempt ran out of time.
    pub timed_out: bool,
    /// Transport error, if any.
    pub error: Option<String>,
    /// The start of the answer (kept with the attempt in Queued mode).
    pub response: String,
    /// A `Retry-After` the target asked for.
    pub retry_after: Option<std::time::Duration>,
    /// How long it took.
    pub latency: std::time::Duration,
}

impl Attempt {
    /// True for a 2xx answer.
    pub fn delivered(&self) -> bool {
        matches!(self.status, Some(200..=299))
    }

    fn outcome(&self) -> DeliveryOutcome {
        match (self.status, self.timed_out) {
            (Some(200..=299), _) => DeliveryOutcome::Success,
            (Some(_), _) => DeliveryOutcome::HttpError,
            (None, true) => DeliveryOutcome::Timeout,
            (None, false) => DeliveryOutcome::Error,
        }
    }
}

/// Reads the status, `Retry-After` and at most [`store::RESPONSE_SNIPPET`] bytes of the answer.
async fn read_answer(mut response: reqwest::Response, limit: std::time::Duration) -> Attempt {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(retry::parse_retry_after);
    let mut snippet = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        while snippet.len() < store::RESPONSE_SNIPPET {
            match response.chunk().await {
                Ok(Some(chunk)) => snippet.extend_from_slice(&chunk),
                _ => break,
            }
        }
    })
    .await;
    snippet.truncate(store::RESPONSE_SNIPPET);
    Attempt {
        status: Some(status),
        response: String::from_utf8_lossy(&snippet).into_owned(),
        retry_after,
        ..Attempt::default()
    }
}
