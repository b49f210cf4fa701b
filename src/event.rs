//! The normalized event sent downstream (`docs/event.schema.json`) and its Standard
//! Webhooks signature.

use crate::crypto;
use crate::provider::{ProviderKind, Verified};
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Map, Value};

/// Version of the event schema; bumped on incompatible changes.
pub const SCHEMA_VERSION: &str = "1";

/// What happened, normalized across platforms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EventType {
    /// A payment was made.
    #[serde(rename = "payment.succeeded")]
    PaymentSucceeded,
    /// The order awaits payment.
    #[serde(rename = "payment.pending")]
    PaymentPending,
    /// The order was closed without (or after a full refund of) payment.
    #[serde(rename = "payment.closed")]
    PaymentClosed,
    /// The trade is finished and can no longer be refunded (Alipay `TRADE_FINISHED`).
    #[serde(rename = "payment.finished")]
    PaymentFinished,
    /// The payment failed.
    #[serde(rename = "payment.failed")]
    PaymentFailed,
    /// A refund was paid out.
    #[serde(rename = "refund.succeeded")]
    RefundSucceeded,
    /// A refund was closed.
    #[serde(rename = "refund.closed")]
    RefundClosed,
    /// A refund could not be paid out and needs handling.
    #[serde(rename = "refund.abnormal")]
    RefundAbnormal,
}

impl EventType {
    /// The dotted name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::PaymentSucceeded => "payment.succeeded",
            EventType::PaymentPending => "payment.pending",
            EventType::PaymentClosed => "payment.closed",
            EventType::PaymentFinished => "payment.finished",
            EventType::PaymentFailed => "payment.failed",
            EventType::RefundSucceeded => "refund.succeeded",
            EventType::RefundClosed => "refund.closed",
            EventType::RefundAbnormal => "refund.abnormal",
        }
    }
}

/// An amount in integer minor units, with the platform's original text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Amount {
    /// Minor units (fen for CNY).
    pub value: i64,
    /// The amount exactly as the platform wrote it.
    pub original: String,
    /// ISO 4217 currency.
    pub currency: String,
}

/// The event delivered downstream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentEvent {
    /// Schema version.
    pub schema_version: &'static str,
    /// Stable across the platform's re-sends: derived from the dedup key.
    pub id: String,
    /// Normalized type.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// Platform.
    pub provider: &'static str,
    /// The route that received it.
    pub route: String,
    /// When paynotify received it (RFC 3339, UTC).
    pub received_at: String,
    /// When the platform says it happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
    /// The platform's status word.
    pub status: String,
    /// The amount this event is about (the refund amount for refunds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<Amount>,
    /// The merchant's order number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// The platform's transaction number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    /// The merchant's refund number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund_id: Option<String>,
    /// The platform's refund number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform_refund_id: Option<String>,
    /// Every verified platform field.
    pub data: EventData,
}

/// Every verified platform field, as the event's `data` object. Form and XML fields stay in
/// the order the platform sent them and are moved, not copied, into the event.
#[derive(Debug, Clone, PartialEq)]
pub enum EventData {
    /// Text fields (Alipay, WeChat Pay v2), with an optional nested object of decrypted
    /// fields (`req_info` of v2 refunds).
    Fields {
        /// The fields, in arrival order.
        fields: Vec<(String, String)>,
        /// A named object of further fields.
        nested: Option<(&'static str, Vec<(String, String)>)>,
    },
    /// A JSON object (WeChat Pay APIv3).
    Json(Map<String, Value>),
}

impl Default for EventData {
    fn default() -> Self {
        EventData::Fields {
            fields: Vec::new(),
            nested: None,
        }
    }
}

impl EventData {
    /// Flat text fields.
    pub fn fields(fields: Vec<(String, String)>) -> Self {
        EventData::Fields {
            fields,
            nested: None,
        }
    }

    /// The data as a JSON value (for tests and tools; events serialize it directly).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

struct FieldsObject<'a>(&'a [(String, String)]);

impl Serialize for FieldsObject<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl Serialize for EventData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EventData::Json(map) => map.serialize(s),
            EventData::Fields { fields, nested } => {
                let mut map =
                    s.serialize_map(Some(fields.len() + usize::from(nested.is_some())))?;
                for (k, v) in fields {
                    map.serialize_entry(k, v)?;
                }
                if let Some((name, inner)) = nested {
                    map.serialize_entry(name, &FieldsObject(inner))?;
                }
                map.end()
            }
        }
    }
}

/// The event id for a dedup key: `evt_` and 32 hex digits of its SHA-256.
pub fn event_id(dedup_key: &str) -> String {
    format!(
        "evt_{}",
        &crypto::hex_lower(&crypto::sha256(dedup_key.as_bytes()))[..32]
    )
}

impl PaymentEvent {
    /// Builds the event for a verified notification.
    pub fn new(route: &str, provider: ProviderKind, verified: Verified, received_at: i64) -> Self {
        PaymentEvent {
            schema_version: SCHEMA_VERSION,
            id: event_id(&verified.dedup_key),
            event_type: verified.event_type,
            provider: provider.as_str(),
            route: route.to_string(),
            received_at: rfc3339_utc(received_at),
            occurred_at: verified.occurred_at,
            status: verified.status,
            amount: verified.amount,
            order_id: verified.order_id,
            transaction_id: verified.transaction_id,
            refund_id: verified.refund_id,
            platform_refund_id: verified.platform_refund_id,
            data: verified.data,
        }
    }
}

/// Unix seconds as RFC 3339 UTC.
pub fn rfc3339_utc(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// A Standard Webhooks signing secret (`whsec_<base64>`).
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

/// Shortest secret accepted, in bytes (Standard Webhooks asks for 24 to 64).
pub const MIN_SECRET_BYTES: usize = 24;

impl WebhookSecret {
    /// Parses `whsec_<base64>`; refuses other forms and short secrets.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(text)
            .map_err(|_| "the secret is not text".to_string())?
            .trim();
        let b64 = text
            .strip_prefix("whsec_")
            .ok_or_else(|| "the secret must look like whsec_<base64>".to_string())?;
        let key = crypto::base64_decode(b64.as_bytes())
            .ok_or_else(|| "the part after whsec_ is not standard base64".to_string())?;
        if key.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the secret is too short: {} bytes, at least {MIN_SECRET_BYTES}",
                key.len()
            ));
        }
        Ok(WebhookSecret(key))
    }

    /// The `webhook-signature` value for `id`, `timestamp` and `body`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut msg = Vec::with_capacity(id.len() + body.len() + 24);
        msg.extend_from_slice(id.as_bytes());
        msg.push(b'.');
        msg.extend_from_slice(timestamp.to_string().as_bytes());
        msg.push(b'.');
        msg.extend_from_slice(body);
        format!(
            "v1,{}",
            crypto::base64_encode(&crypto::hmac_sha256(&self.0, &msg))
        )
    }

    /// Checks a `webhook-signature` header value (space-separated list), in constant time.
    pub fn verify(&self, id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        let expected = self.sign(id, timestamp, body);
        header
            .split(' ')
            .any(|sig| crypto::ct_eq(sig.as_bytes(), expected.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_reference_vector() {
        // The example from the Standard Webhooks specification.
        let secret = WebhookSecret::parse(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(secret.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
            &format!("v1,bogus {sig}")
        ));
        assert!(!secret.verify("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body, &sig));
    }

    #[test]
    fn secrets_are_checked() {
        assert!(WebhookSecret::parse(b"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(
            WebhookSecret::parse(b"whsec_c2hvcnQ=")
                .unwrap_err()
                .contains("too short")
        );
        assert!(WebhookSecret::parse(b"whsec_***").is_err());
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(event_id("a"), event_id("a"));
        assert_ne!(event_id("a"), event_id("b"));
        assert_eq!(event_id("a").len(), 36);
    }
}
