//! The hot path: route lookup → capped body read → adapter → dedup → delivery → the
//! platform's answer.

use super::Ingress;
use super::metrics::Outcome;
use crate::delivery::dedup::{self, Claim};
use crate::delivery::store::{Appended, NewEvent};
use crate::event::PaymentEvent;
use crate::provider::{Answer, Failure, Incoming, RejectReason};
use crate::spec::DeliveryMode;
use crate::table::Route;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Instant;

pub(super) async fn notify(State(ingress): State<Arc<Ingress>>, request: Request) -> Response {
    let start = Instant::now();
    let table = ingress.table();
    let Some(route) = table.get(request.uri().path()).cloned() else {
        ingress.metrics.unrouted(start.elapsed().as_secs_f64());
        return (StatusCode::NOT_FOUND, "no route for this path\n").into_response();
    };
    drop(table);
    let kind = route.adapter.kind();
    let (outcome, answer) = match tokio::time::timeout(
        ingress.limits.request_timeout,
        handle(&ingress, &route, request),
    )
    .await
    {
        Ok(done) => done,
        Err(_) => {
            tracing::warn!(route = %route.name, "request timed out");
            (
                Outcome::Timeout,
                route.adapter.failure(Failure::Unavailable),
            )
        }
    };
    ingress
        .metrics
        .notification(&route.name, kind, outcome, start.elapsed().as_secs_f64());
    respond(answer)
}

async fn handle(ingress: &Ingress, route: &Route, request: Request) -> (Outcome, Answer) {
    let reject = |reason: RejectReason| {
        (
            Outcome::Rejected(reason),
            route.adapter.failure(Failure::Rejected(reason)),
        )
    };
    if request.method() != http::Method::POST {
        tracing::info!(route = %route.name, method = %request.method(), "rejected: not a POST");
        return reject(RejectReason::Malformed);
    }
    let (parts, body) = request.into_parts();
    let body = match read_capped(body, ingress.limits.max_body_bytes, &parts.headers).await {
        Ok(body) => body,
        Err(reason) => {
            tracing::info!(route = %route.name, limit = ingress.limits.max_body_bytes, reason = reason.as_str(), "rejected: body too large or unreadable");
            return reject(reason);
        }
    };
    let now = (ingress.clock)();
    let verify_start = Instant::now();
    let verified = route.adapter.authenticate(&Incoming {
        headers: &parts.headers,
        body: &body,
        now,
    });
    ingress
        .metrics
        .verified(route.adapter.kind(), verify_start.elapsed().as_secs_f64());
    let verified = match verified {
        Ok(v) => v,
        Err(rejection) => {
            tracing::info!(route = %route.name, reason = rejection.reason.as_str(), detail = %rejection.detail, "rejected notification");
            return reject(rejection.reason);
        }
    };
    let event = PaymentEvent::new(&route.name, route.adapter.kind(), verified, now);
    if route.mode == DeliveryMode::Queued {
        return enqueue(ingress, route, &event).await;
    }
    let delivered = match ingress.dedup.claim(&event.id, Instant::now()) {
        Claim::Duplicate => {
            tracing::debug!(route = %route.name, event_id = %event.id, "duplicate of a delivered notification");
            return (Outcome::Duplicate, route.adapter.success());
        }
        Claim::InFlight(rx) => {
            if dedup::wait(rx).await {
                return (Outcome::Duplicate, route.adapter.success());
            }
            false
        }
        Claim::Owner(guard) => {
            let result = ingress
                .forwarder
                .deliver(route, &event, now, &ingress.metrics)
                .await;
            let ok = result.is_ok();
            let evicted = guard.finish(ok, Instant::now());
            ingress.metrics.dedup_evictions.inc_by(evicted as u64);
            match result {
                Ok(()) => {
                    tracing::debug!(route = %route.name, event_id = %event.id, event_type = event.event_type.as_str(), "notification verified and delivered")
                }
                Err(e) => {
                    tracing::warn!(route = %route.name, event_id = %event.id, error = %e, "delivery failed; the platform will retry")
                }
            }
            ok
        }
    };
    if delivered {
        (Outcome::Accepted, route.adapter.success())
    } else {
        (
            Outcome::DeliveryFailed,
            route.adapter.failure(Failure::Unavailable),
        )
    }
}

/// Queued mode: the answer is success once the event is durable, and the store's unique
/// event id is the dedup (across restarts and for the whole retention).
async fn enqueue(ingress: &Ingress, route: &Route, event: &PaymentEvent) -> (Outcome, Answer) {
    let unavailable = (
        Outcome::StoreUnavailable,
        route.adapter.failure(Failure::Unavailable),
    );
    let Some(queue) = ingress.queue() else {
        tracing::error!(route = %route.name, "a Queued route but no store is configured");
        return unavailable;
    };
    let body = match serde_json::to_vec(event) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the event");
            return unavailable;
        }
    };
    let order = event.order_id.as_deref().unwrap_or(&event.id);
    let new = NewEvent {
        id: event.id.clone(),
        route: route.name.clone(),
        order_key: format!("{}|{order}", route.name),
        received_at_ms: crate::delivery::queue::now_ms(),
        body,
        targets: route
            .targets
            .iter()
            .map(|t| t.label().to_string())
            .collect(),
    };
    let start = Instant::now();
    let stored = queue.store.append(new).await;
    ingress
        .metrics
        .store_write_duration
        .observe(start.elapsed().as_secs_f64());
    match stored {
        Ok(Appended::Stored) => {
            queue.wake.notify_one();
            tracing::debug!(route = %route.name, event_id = %event.id, "notification verified and queued");
            (Outcome::Accepted, route.adapter.success())
        }
        Ok(Appended::Duplicate) => (Outcome::Duplicate, route.adapter.success()),
        Err(e) => {
            ingress.metrics.store_errors.inc();
            tracing::error!(route = %route.name, event_id = %event.id, error = %e, "cannot store the event; the platform will retry");
            unavailable
        }
    }
}

/// Reads at most `limit` bytes: `Oversize` when the body is larger (declared or actual),
/// `Malformed` when the client breaks off mid-body.
async fn read_capped(
    body: Body,
    limit: usize,
    headers: &http::HeaderMap,
) -> Result<bytes::Bytes, RejectReason> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(RejectReason::Oversize);
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(RejectReason::Oversize),
        Err(_) => Err(RejectReason::Malformed),
    }
}

fn respond(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match answer.content_type {
        Some(ct) => (status, [(http::header::CONTENT_TYPE, ct)], answer.body).into_response(),
        None => status.into_response(),
    }
}
