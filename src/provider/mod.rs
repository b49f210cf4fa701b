//! Pure provider adapters: parse, authenticate, apply the route's policy, normalize, and
//! write the platform's answer. No IO and no clock: the time is passed in.
//!
//! Adding a provider is adding one module and one arm to [`Adapter`].

pub mod alipay;
mod form;
mod json;
pub mod wechatpay_v2;
pub mod wechatpay_v3;
mod xml;

use crate::event::{Amount, EventData, EventType};

/// The platforms paynotify speaks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// Alipay (form POST, RSA/RSA2).
    Alipay,
    /// WeChat Pay API v2 (XML, MD5/HMAC-SHA256, AES-256-ECB refunds).
    WechatPayV2,
    /// WeChat Pay APIv3 (JSON, SHA256withRSA, AES-256-GCM).
    WechatPayV3,
}

impl ProviderKind {
    /// The label used in metrics, events and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Alipay => "alipay",
            ProviderKind::WechatPayV2 => "wechatpay-v2",
            ProviderKind::WechatPayV3 => "wechatpay-v3",
        }
    }
}

/// Why a notification was refused. The set is fixed: each value is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// No body at all.
    EmptyBody,
    /// The body is larger than the configured cap.
    Oversize,
    /// The body does not parse, or a required field is missing or ill-formed.
    Malformed,
    /// Bytes that are not valid UTF-8 where UTF-8 is required.
    InvalidUtf8,
    /// A key, element or JSON member appears twice.
    DuplicateField,
    /// XML with a DTD, entity declaration or processing instruction.
    XmlDtd,
    /// No signature.
    MissingSignature,
    /// The signature does not verify.
    BadSignature,
    /// The notification names another or an unknown signature type.
    SignTypeMismatch,
    /// app_id / mch_id / appid is not the route's.
    MerchantMismatch,
    /// `Wechatpay-Serial` names no configured key.
    UnknownSerial,
    /// The APIv3 timestamp is outside the allowed window.
    StaleTimestamp,
    /// An encrypted part does not decrypt.
    DecryptFailed,
    /// A verified notification of a kind the route does not handle.
    UnsupportedEvent,
}

impl RejectReason {
    /// Every reason, for metric initialisation and documentation.
    pub const ALL: [RejectReason; 14] = [
        RejectReason::EmptyBody,
        RejectReason::Oversize,
        RejectReason::Malformed,
        RejectReason::InvalidUtf8,
        RejectReason::DuplicateField,
        RejectReason::XmlDtd,
        RejectReason::MissingSignature,
        RejectReason::BadSignature,
        RejectReason::SignTypeMismatch,
        RejectReason::MerchantMismatch,
        RejectReason::UnknownSerial,
        RejectReason::StaleTimestamp,
        RejectReason::DecryptFailed,
        RejectReason::UnsupportedEvent,
    ];

    /// The snake_case name (metric label suffix, fixture `reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::EmptyBody => "empty_body",
            RejectReason::Oversize => "oversize",
            RejectReason::Malformed => "malformed",
            RejectReason::InvalidUtf8 => "invalid_utf8",
            RejectReason::DuplicateField => "duplicate_field",
            RejectReason::XmlDtd => "xml_dtd",
            RejectReason::MissingSignature => "missing_signature",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::SignTypeMismatch => "sign_type_mismatch",
            RejectReason::MerchantMismatch => "merchant_mismatch",
            RejectReason::UnknownSerial => "unknown_serial",
            RejectReason::StaleTimestamp => "stale_timestamp",
            RejectReason::DecryptFailed => "decrypt_failed",
            RejectReason::UnsupportedEvent => "unsupported_event",
        }
    }

    /// Parses the snake_case name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A refused notification: the reason (bounded, for metrics) and a detail for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct Rejection {
    /// The bounded reason.
    pub reason: RejectReason,
    /// What exactly was wrong (never key material or the whole body).
    pub detail: String,
}

impl Rejection {
    /// A rejection with a detail message.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

/// Shorthand for adapter results.
pub type Outcome<T> = Result<T, Rejection>;

/// One incoming notification, as the adapter sees it.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// Request headers.
    pub headers: &'a http::HeaderMap,
    /// The exact body bytes.
    pub body: &'a [u8],
    /// Now, in unix seconds.
    pub now: i64,
}

/// A notification that passed authentication and policy, normalized.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The normalized event type.
    pub event_type: EventType,
    /// The deduplication key (architecture.md §5); the event id derives from it.
    pub dedup_key: String,
    /// The amount this event is about (the refund amount for refunds).
    pub amount: Option<Amount>,
    /// The merchant's order number.
    pub order_id: Option<String>,
    /// The platform's transaction number.
    pub transaction_id: Option<String>,
    /// The merchant's refund number (refund events).
    pub refund_id: Option<String>,
    /// The platform's refund number (refund events).
    pub platform_refund_id: Option<String>,
    /// The platform's status word, as sent.
    pub status: String,
    /// When the platform says the event happened (RFC 3339), if it says.
    pub occurred_at: Option<String>,
    /// Every verified platform field, decrypted resources included.
    pub data: EventData,
}

/// The platform's answer, ready to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Content type, if there is a body.
    pub content_type: Option<&'static str>,
    /// The body.
    pub body: String,
}

/// Why the platform gets a failure answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The notification was refused.
    Rejected(RejectReason),
    /// Verified, but not delivered: the platform must retry.
    Unavailable,
}

impl Failure {
    fn status(self) -> u16 {
        match self {
            Failure::Rejected(RejectReason::Oversize) => 413,
            Failure::Rejected(_) => 400,
            Failure::Unavailable => 503,
        }
    }

    /// A short, fixed message for the platform (never request content).
    pub fn message(self) -> &'static str {
        match self {
            Failure::Rejected(r) => r.as_str(),
            Failure::Unavailable => "temporarily_unavailable",
        }
    }
}

/// A route's compiled adapter.
#[derive(Debug)]
pub enum Adapter {
    /// Alipay.
    Alipay(alipay::Alipay),
    /// WeChat Pay v2.
    WechatPayV2(wechatpay_v2::WechatPayV2),
    /// WeChat Pay APIv3.
    WechatPayV3(wechatpay_v3::WechatPayV3),
}

impl Adapter {
    /// Which platform.
    pub fn kind(&self) -> ProviderKind {
        match self {
            Adapter::Alipay(_) => ProviderKind::Alipay,
            Adapter::WechatPayV2(_) => ProviderKind::WechatPayV2,
            Adapter::WechatPayV3(_) => ProviderKind::WechatPayV3,
        }
    }

    /// The certificates this adapter verifies with: (serial, notAfter unix seconds).
    pub fn certificates(&self) -> Vec<(String, i64)> {
        let keys: Vec<&crate::keys::RsaPublicKey> = match self {
            Adapter::Alipay(a) => vec![a.key()],
            Adapter::WechatPayV2(_) => Vec::new(),
            Adapter::WechatPayV3(a) => a.keys().map(|(_, k)| &k.key).collect(),
        };
        keys.into_iter()
            .filter_map(|k| k.certificate.as_ref())
            .map(|c| (c.serial_hex.clone(), c.not_after))
            .collect()
    }

    /// Parse, authenticate, check policy and normalize one notification.
    pub fn authenticate(&self, incoming: &Incoming<'_>) -> Outcome<Verified> {
        if incoming.body.is_empty() {
            return Err(Rejection::new(
                RejectReason::EmptyBody,
                "the request has no body",
            ));
        }
        match self {
            Adapter::Alipay(a) => a.authenticate(incoming),
            Adapter::WechatPayV2(a) => a.authenticate(incoming),
            Adapter::WechatPayV3(a) => a.authenticate(incoming),
        }
    }

    /// The platform's success answer.
    pub fn success(&self) -> Answer {
        match self.kind() {
            ProviderKind::Alipay => Answer {
                status: 200,
                content_type: Some(TEXT),
                body: "success".into(),
            },
            ProviderKind::WechatPayV2 => Answer {
                status: 200,
                content_type: Some(XML),
                body: wechatpay_v2::answer("SUCCESS", "OK"),
            },
            ProviderKind::WechatPayV3 => Answer {
                status: 204,
                content_type: None,
                body: String::new(),
            },
        }
    }

    /// The platform's failure answer, so that it retries.
    pub fn failure(&self, failure: Failure) -> Answer {
        failure_answer(self.kind(), failure)
    }
}

/// The platform's failure answer for `kind`.
pub fn failure_answer(kind: ProviderKind, failure: Failure) -> Answer {
    let status = failure.status();
    match kind {
        ProviderKind::Alipay => Answer {
            status,
            content_type: Some(TEXT),
            body: "fail".into(),
        },
        ProviderKind::WechatPayV2 => Answer {
            status,
            content_type: Some(XML),
            body: wechatpay_v2::answer("FAIL", failure.message()),
        },
        ProviderKind::WechatPayV3 => Answer {
            status,
            content_type: Some(JSON),
            body: serde_json::json!({"code": "FAIL", "message": failure.message()}).to_string(),
        },
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const XML: &str = "application/xml; charset=utf-8";
const JSON: &str = "application/json";

/// Decoded text fields of a form or XML notification, in arrival order, names unique.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TextFields(pub(crate) Vec<(String, String)>);

impl TextFields {
    /// The value of `name`, empty or not.
    pub(crate) fn raw(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `name`; an empty value counts as absent, as the platforms send empty
    /// elements for fields that do not apply.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.raw(name).filter(|v| !v.is_empty())
    }

    /// The non-empty value of `name`, or a `Malformed` rejection saying where it is missing.
    pub(crate) fn required(&self, name: &str, place: &str) -> Outcome<&str> {
        self.get(name).ok_or_else(|| {
            Rejection::new(RejectReason::Malformed, format!("{place} has no {name}"))
        })
    }

    /// Every field but `skip`, moved out (the event's `data`).
    pub(crate) fn into_fields(self, skip: &str) -> Vec<(String, String)> {
        let mut fields = self.0;
        fields.retain(|(k, _)| k != skip);
        fields
    }

    /// Records every field on `trace` under `prefix`.
    pub(crate) fn trace<T: Trace>(&self, trace: &mut T, prefix: &str) {
        if T::ENABLED {
            for (k, v) in &self.0 {
                trace.field(&format!("{prefix}{k}"), v);
            }
        }
    }
}

/// Converts an amount given in yuan with up to two decimals ("88.88") to fen.
pub(crate) fn yuan_to_minor(text: &str) -> Option<i64> {
    let (int, frac) = match text.split_once('.') {
        Some((i, f)) => (i, f),
        None => (text, ""),
    };
    if int.is_empty()
        || int.len() > 15
        || frac.len() > 2
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || (text.contains('.') && frac.is_empty())
    {
        return None;
    }
    let mut minor: i64 = int.parse().ok()?;
    minor = minor.checked_mul(100)?;
    let frac_val: i64 = match frac.len() {
        0 => 0,
        1 => frac.parse::<i64>().ok()? * 10,
        _ => frac.parse().ok()?,
    };
    minor.checked_add(frac_val)
}

/// Converts "yyyy-MM-dd HH:mm:ss" in China Standard Time to RFC 3339.
pub(crate) fn china_time_to_rfc3339(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let ok = b.len() == 19
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b' '
        && b[13] == b':'
        && b[16] == b':'
        && b.iter()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16].contains(&i) || c.is_ascii_digit());
    ok.then(|| format!("{}T{}+08:00", &text[..10], &text[11..]))
}

/// Converts "yyyyMMddHHmmss" in China Standard Time to RFC 3339.
pub(crate) fn compact_china_time_to_rfc3339(text: &str) -> Option<String> {
    if text.len() != 14 || !text.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(format!(
        "{}-{}-{}T{}:{}:{}+08:00",
        &text[0..4],
        &text[4..6],
        &text[6..8],
        &text[8..10],
        &text[10..12],
        &text[12..14]
    ))
}

/// Observes an adapter's steps. The hot path uses [`NoTrace`], which compiles to nothing;
/// `paynotify verify` records every step to explain a verdict.
pub trait Trace {
    /// Whether recording is on (guards formatting work on the hot path).
    const ENABLED: bool = false;
    /// A parsed field (already decoded to text for display).
    fn field(&mut self, _name: &str, _value: &str) {}
    /// The exact bytes that are signed.
    fn signed_message(&mut self, _message: &[u8]) {}
    /// The algorithm checked.
    fn algorithm(&mut self, _name: &str) {}
    /// A fact worth showing (key fingerprint, serial, decryption result…).
    fn note(&mut self, _note: String) {}
    /// The RSA check that was made, so a failure can be diagnosed.
    fn rsa_check(&mut self, _spki_der: &[u8], _hash: crate::crypto::RsaHash, _signature: &[u8]) {}
}

/// The hot path's tracer: records nothing.
pub struct NoTrace;

impl Trace for NoTrace {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuan_amounts() {
        assert_eq!(yuan_to_minor("88.88"), Some(8888));
        assert_eq!(yuan_to_minor("0.01"), Some(1));
        assert_eq!(yuan_to_minor("1.5"), Some(150));
        assert_eq!(yuan_to_minor("100"), Some(10000));
        for bad in ["", ".5", "1.", "1.234", "-1", "1e3", " 1", "1,00", "0x10"] {
            assert_eq!(yuan_to_minor(bad), None, "{bad}");
        }
    }

    #[test]
    fn china_times() {
        assert_eq!(
            china_time_to_rfc3339("2024-05-01 12:00:05").as_deref(),
            Some("2024-05-01T12:00:05+08:00")
        );
        assert_eq!(china_time_to_rfc3339("2024-05-01T12:00:05"), None);
        assert_eq!(
            compact_china_time_to_rfc3339("20240501120005").as_deref(),
            Some("2024-05-01T12:00:05+08:00")
        );
    }

    #[test]
    fn reasons_round_trip() {
        for r in RejectReason::ALL {
            assert_eq!(RejectReason::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn failure_answers_follow_each_platform() {
        let a = failure_answer(
            ProviderKind::Alipay,
            Failure::Rejected(RejectReason::BadSignature),
        );
        assert_eq!((a.status, a.body.as_str()), (400, "fail"));
        let w = failure_answer(ProviderKind::WechatPayV2, Failure::Unavailable);
        assert_eq!(w.status, 503);
        assert_eq!(
            w.body,
            "<xml><return_code><![CDATA[FAIL]]></return_code><return_msg><![CDATA[temporarily_unavailable]]></return_msg></xml>"
        );
        let v = failure_answer(
            ProviderKind::WechatPayV3,
            Failure::Rejected(RejectReason::Oversize),
        );
        assert_eq!(v.status, 413);
        assert_eq!(v.body, r#"{"code":"FAIL","message":"oversize"}"#);
    }
}
