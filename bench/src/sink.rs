//! The downstream sink: accepts every delivered event after checking its Standard Webhooks
//! signature and its shape, and counts them (GET /stats; POST /reset).

use crate::Error;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use paynotify::event::WebhookSecret;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Counts {
    valid: u64,
    invalid: u64,
    ids: HashSet<String>,
}

struct Sink {
    secret: WebhookSecret,
    counts: Mutex<Counts>,
}

/// Runs the sink until killed.
pub fn serve(listen: std::net::SocketAddr, secret: &str) -> Result<(), Error> {
    let secret = WebhookSecret::parse(secret.as_bytes())?;
    let sink = Arc::new(Sink {
        secret,
        counts: Mutex::new(Counts::default()),
    });
    let app = Router::new()
        .route("/events", post(event))
        .route("/stats", get(stats))
        .route("/reset", post(reset))
        .with_state(sink);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        axum::serve(listener, app).await?;
        Ok(())
    })
}

async fn event(State(sink): State<Arc<Sink>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let id = header("webhook-id");
    let signed = header("webhook-timestamp").parse().is_ok_and(|ts| {
        sink.secret
            .verify(&id, ts, &body, &header("webhook-signature"))
    });
    let shaped = serde_json::from_slice::<Value>(&body).is_ok_and(|e| {
        e["id"] == id.as_str()
            && e["type"] == "payment.succeeded"
            && e["amount"]["value"].as_i64() == Some(1234)
            && e["orderId"].as_str().is_some_and(|o| o.starts_with('B'))
    });
    let Ok(mut counts) = sink.counts.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    if signed && shaped {
        counts.valid += 1;
        counts.ids.insert(id);
        StatusCode::NO_CONTENT
    } else {
        counts.invalid += 1;
        StatusCode::BAD_REQUEST
    }
}

async fn stats(State(sink): State<Arc<Sink>>) -> axum::Json<Value> {
    let counts = sink
        .counts
        .lock()
        .map(|c| (c.valid, c.invalid, c.ids.len()))
        .unwrap_or_default();
    axum::Json(json!({"valid": counts.0, "invalid": counts.1, "unique": counts.2}))
}

async fn reset(State(sink): State<Arc<Sink>>) -> StatusCode {
    if let Ok(mut c) = sink.counts.lock() {
        *c = Counts::default();
    }
    StatusCode::NO_CONTENT
}
