//! Delivery downstream: Standard Webhooks-signed POSTs to every target of a route, and the
//! deduplication cache in front of them.

pub mod dedup;
pub mod retry;
pub mod store;

use crate::event::PaymentEvent;
use crate::ingress::metrics::{DeliveryOutcome, Metrics};
use crate::table::{Route, Target};
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
        let body = serde_json::to_vec(event)?;
        let signature = route.signing.sign(&event.id, now_unix, &body);
        let attempts = route.targets.iter().map(|target| {
            let body = body.clone();
            let signature = signature.clone();
            async move {
                let start = Instant::now();
                let outcome = match target {
                    Target::Log => {
                        tracing::info!(route = %route.name, event = %String::from_utf8_lossy(&body), "delivered event (log target)");
                        DeliveryOutcome::Success
                    }
                    Target::Url(url) => {
                        let sent = self
                            .client
                            .post(url.clone())
                            .timeout(route.timeout)
                            .header(http::header::CONTENT_TYPE, "application/json")
                            .header("webhook-id", &event.id)
                            .header("webhook-timestamp", now_unix.to_string())
                            .header("webhook-signature", signature)
                            .body(body)
                            .send()
                            .await;
                        classify(sent)
                    }
                };
                metrics.delivery(&route.name, target.label(), outcome, start.elapsed().as_secs_f64());
                if outcome != DeliveryOutcome::Success {
                    tracing::warn!(route = %route.name, target = target.label(), event_id = %event.id, outcome = outcome.label(), "delivery failed");
                }
                outcome == DeliveryOutcome::Success
            }
        });
        let results = join_all(attempts).await;
        let failed = results.iter().filter(|ok| !**ok).count();
        if failed == 0 {
            Ok(())
        } else {
            Err(DeliveryError::Targets {
                failed,
                total: results.len(),
            })
        }
    }
}

fn classify(sent: Result<reqwest::Response, reqwest::Error>) -> DeliveryOutcome {
    match sent {
        Ok(resp) if resp.status().is_success() => DeliveryOutcome::Success,
        Ok(_) => DeliveryOutcome::HttpError,
        Err(e) if e.is_timeout() => DeliveryOutcome::Timeout,
        Err(_) => DeliveryOutcome::Error,
    }
}
