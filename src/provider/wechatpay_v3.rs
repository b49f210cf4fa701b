//! WeChat Pay APIv3 notifications: JSON with `Wechatpay-*` headers, SHA256withRSA over
//! `timestamp\nnonce\nbody\n`, resource encrypted with AEAD_AES_256_GCM.

use super::{Incoming, Outcome, RejectReason, Rejection, Trace, Verified, json};
use crate::crypto::{self, RsaHash, RsaVerifier};
use crate::event::{Amount, EventData, EventType};
use crate::keys::{KeyError, RsaPublicKey, parse_ascii_secret};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// The only signature type WeChat Pay uses for RSA merchants.
pub const SIGNATURE_TYPE: &str = "WECHATPAY2-SHA256-RSA2048";
/// Prefix of WeChat's deliberate signature probes.
const SIGNTEST_PREFIX: &str = "WECHATPAY/SIGNTEST/";
/// Prefix of WeChat Pay public-key ids.
pub const PUBLIC_KEY_ID_PREFIX: &str = "PUB_KEY_ID_";
/// Default allowed distance between `Wechatpay-Timestamp` and now.
pub const DEFAULT_MAX_CLOCK_SKEW_SECS: i64 = 300;

/// One verification key, found by its serial.
#[derive(Debug)]
pub struct PlatformKey {
    /// The key (and its certificate, in platform-certificate mode).
    pub key: RsaPublicKey,
    verifier: RsaVerifier,
}

/// A route's WeChat Pay APIv3 settings, compiled.
pub struct WechatPayV3 {
    mch_id: Option<String>,
    app_id: Option<String>,
    api_v3_key: Vec<u8>,
    keys: HashMap<String, PlatformKey>,
    max_clock_skew: i64,
}

impl std::fmt::Debug for WechatPayV3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WechatPayV3")
            .field("mch_id", &self.mch_id)
            .field("serials", &self.keys.keys().collect::<Vec<_>>())
            .field("max_clock_skew", &self.max_clock_skew)
            .finish_non_exhaustive()
    }
}

/// Why APIv3 settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum V3ConfigError {
    /// A key or certificate did not parse.
    #[error("{what}: {source}")]
    Key {
        /// Which key.
        what: String,
        /// Why.
        source: KeyError,
    },
    /// A platform certificate entry is a bare key.
    #[error(
        "platformCertificates[{0}] is a public key, not a certificate; give public keys as publicKey with their PUB_KEY_ID_ id"
    )]
    NotCertificate(usize),
    /// The public key id does not look like WeChat's.
    #[error("publicKey.id must start with {PUBLIC_KEY_ID_PREFIX}, got {0:?}")]
    BadPublicKeyId(String),
    /// Two keys share a serial.
    #[error("serial {0} is configured twice")]
    DuplicateSerial(String),
    /// No key at all.
    #[error("no verification key: give platformCertificates, publicKey, or both")]
    NoKeys,
}

impl WechatPayV3 {
    /// Compiles the settings. `mch_id` is `None` only for the offline `verify` command.
    pub fn new(
        mch_id: Option<String>,
        app_id: Option<String>,
        api_v3_key: &[u8],
        platform_certificates: &[Vec<u8>],
        public_key: Option<(&str, &[u8])>,
        max_clock_skew_secs: i64,
    ) -> Result<Self, V3ConfigError> {
        let api_v3_key = parse_ascii_secret(api_v3_key, 32, "the APIv3 key").map_err(|source| {
            V3ConfigError::Key {
                what: "apiV3Key".into(),
                source,
            }
        })?;
        let mut keys = HashMap::new();
        let mut add =
            |serial: String, key: RsaPublicKey, what: String| -> Result<(), V3ConfigError> {
                let verifier = key
                    .verifier(RsaHash::Sha256, 2048)
                    .map_err(|source| V3ConfigError::Key { what, source })?;
                if keys
                    .insert(serial.clone(), PlatformKey { key, verifier })
                    .is_some()
                {
                    return Err(V3ConfigError::DuplicateSerial(serial));
                }
                Ok(())
            };
        for (i, pem) in platform_certificates.iter().enumerate() {
            let what = format!("platformCertificates[{i}]");
            let key = RsaPublicKey::parse(pem).map_err(|source| V3ConfigError::Key {
                what: what.clone(),
                source,
            })?;
            let serial = key
                .certificate
                .as_ref()
                .ok_or(V3ConfigError::NotCertificate(i))?
                .serial_hex
                .clone();
            add(serial, key, what)?;
        }
        if let Some((id, pem)) = public_key {
            if !id.starts_with(PUBLIC_KEY_ID_PREFIX) || id.len() == PUBLIC_KEY_ID_PREFIX.len() {
                return Err(V3ConfigError::BadPublicKeyId(id.to_string()));
            }
            let key = RsaPublicKey::parse(pem).map_err(|source| V3ConfigError::Key {
                what: "publicKey.key".into(),
                source,
            })?;
            add(id.to_string(), key, "publicKey.key".into())?;
        }
        if keys.is_empty() {
            return Err(V3ConfigError::NoKeys);
        }
        Ok(WechatPayV3 {
            mch_id,
            app_id,
            api_v3_key,
            keys,
            max_clock_skew: max_clock_skew_secs,
        })
    }

    /// The configured keys by serial.
    pub fn keys(&self) -> impl Iterator<Item = (&str, &PlatformKey)> {
        self.keys.iter().map(|(s, k)| (s.as_str(), k))
    }

    pub(super) fn authenticate(&self, incoming: &Incoming<'_>) -> Outcome<Verified> {
        self.run(incoming, &mut super::NoTrace)
    }

    /// The adapter's pipeline, observed by `trace`.
    pub fn run<T: Trace>(&self, incoming: &Incoming<'_>, trace: &mut T) -> Outcome<Verified> {
        let signature = header(incoming, "wechatpay-signature")?.ok_or_else(|| {
            Rejection::new(
                RejectReason::MissingSignature,
                "no Wechatpay-Signature header",
            )
        })?;
        let required = |name: &str| -> Outcome<&str> {
            header(incoming, name)?
                .ok_or_else(|| Rejection::new(RejectReason::Malformed, format!("no {name} header")))
        };
        let timestamp = required("wechatpay-timestamp")?;
        let nonce = required("wechatpay-nonce")?;
        let serial = required("wechatpay-serial")?;
        if T::ENABLED {
            for (name, value) in [
                ("Wechatpay-Timestamp", timestamp),
                ("Wechatpay-Nonce", nonce),
                ("Wechatpay-Serial", serial),
            ] {
                trace.field(name, value);
            }
            trace.algorithm(RsaHash::Sha256.algorithm_name());
        }
        if let Some(kind) = header(incoming, "wechatpay-signature-type")?
            && kind != SIGNATURE_TYPE
        {
            return Err(Rejection::new(
                RejectReason::SignTypeMismatch,
                format!("Wechatpay-Signature-Type {kind:?} is not {SIGNATURE_TYPE}"),
            ));
        }
        if signature.starts_with(SIGNTEST_PREFIX) {
            return Err(Rejection::new(
                RejectReason::BadSignature,
                "WeChat Pay signature probe (WECHATPAY/SIGNTEST/)",
            ));
        }
        let ts: i64 = timestamp
            .parse()
            .ok()
            .filter(|_| timestamp.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                Rejection::new(
                    RejectReason::Malformed,
                    "Wechatpay-Timestamp is not unix seconds",
                )
            })?;
        let skew = incoming.now.saturating_sub(ts);
        if skew.abs() > self.max_clock_skew {
            return Err(Rejection::new(
                RejectReason::StaleTimestamp,
                format!(
                    "timestamp is {}s {} now; at most {}s allowed",
                    skew.abs(),
                    if skew > 0 { "before" } else { "after" },
                    self.max_clock_skew
                ),
            ));
        }
        let lookup = if serial.starts_with(PUBLIC_KEY_ID_PREFIX) {
            serial.to_string()
        } else {
            serial.to_ascii_uppercase()
        };
        let key = self.keys.get(&lookup).ok_or_else(|| {
            Rejection::new(
                RejectReason::UnknownSerial,
                format!("Wechatpay-Serial {serial} names no configured key"),
            )
        })?;
        if let Some(cert) = &key.key.certificate
            && (incoming.now < cert.not_before || incoming.now > cert.not_after)
        {
            return Err(Rejection::new(
                RejectReason::UnknownSerial,
                format!(
                    "platform certificate {serial} is not valid now (valid {}..{})",
                    cert.not_before, cert.not_after
                ),
            ));
        }
        let mut message =
            Vec::with_capacity(timestamp.len() + nonce.len() + incoming.body.len() + 3);
        for part in [timestamp.as_bytes(), nonce.as_bytes(), incoming.body] {
            message.extend_from_slice(part);
            message.push(b'\n');
        }
        if T::ENABLED {
            trace.signed_message(&message);
            trace.note(format!(
                "key for serial {lookup}: {} ({} bits)",
                key.key.fingerprint(),
                key.key.bits()
            ));
        }
        let sig = crypto::base64_decode(signature.as_bytes()).ok_or_else(|| {
            Rejection::new(
                RejectReason::BadSignature,
                "Wechatpay-Signature is not standard base64",
            )
        })?;
        if T::ENABLED {
            trace.rsa_check(key.key.spki_der(), RsaHash::Sha256, &sig);
        }
        if !key.verifier.verify(&message, &sig) {
            return Err(Rejection::new(
                RejectReason::BadSignature,
                "signature does not verify",
            ));
        }
        let notification = json::parse(incoming.body, "notification body")?;
        let resource = self.decrypt(&notification)?;
        if T::ENABLED {
            trace.note(format!("decrypted resource: {resource}"));
        }
        self.check_merchant(&resource)?;
        normalize(notification, resource)
    }

    fn decrypt(&self, notification: &Value) -> Outcome<Value> {
        let failed = |d: &str| Rejection::new(RejectReason::DecryptFailed, d.to_string());
        let resource = notification
            .get("resource")
            .and_then(Value::as_object)
            .ok_or_else(|| Rejection::new(RejectReason::Malformed, "no resource object"))?;
        let text = |name: &str| resource.get(name).and_then(Value::as_str);
        if text("algorithm") != Some("AEAD_AES_256_GCM") {
            return Err(failed("resource.algorithm is not AEAD_AES_256_GCM"));
        }
        let nonce = text("nonce").ok_or_else(|| failed("no resource.nonce"))?;
        let aad = match resource.get("associated_data") {
            None | Some(Value::Null) => "",
            Some(Value::String(s)) => s,
            Some(_) => return Err(failed("resource.associated_data is not a string")),
        };
        let ciphertext = text("ciphertext")
            .and_then(|c| crypto::base64_decode(c.as_bytes()))
            .ok_or_else(|| failed("resource.ciphertext is missing or not base64"))?;
        let plain = crypto::aes256_gcm_open(
            &self.api_v3_key,
            nonce.as_bytes(),
            aad.as_bytes(),
            &ciphertext,
        )
        .map_err(|e| failed(&format!("resource: {e}")))?;
        json::parse(&plain, "decrypted resource")
    }

    fn check_merchant(&self, resource: &Value) -> Outcome<()> {
        let field = |a: &str, b: &str| {
            resource
                .get(a)
                .or_else(|| resource.get(b))
                .and_then(Value::as_str)
        };
        for (name, got, want) in [
            ("mchid", field("mchid", "sp_mchid"), &self.mch_id),
            ("appid", field("appid", "sp_appid"), &self.app_id),
        ] {
            if let Some(want) = want
                && got != Some(want.as_str())
            {
                return Err(Rejection::new(
                    RejectReason::MerchantMismatch,
                    format!(
                        "resource {name} {:?} is not the route's {want}",
                        got.unwrap_or("")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// One header's value; a repeated header is refused so that no proxy can choose for us.
fn header<'a>(incoming: &Incoming<'a>, name: &str) -> Outcome<Option<&'a str>> {
    let mut values = incoming.headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Rejection::new(
            RejectReason::DuplicateField,
            format!("header {name} appears more than once"),
        ));
    }
    first.to_str().map(|v| Some(v.trim())).map_err(|_| {
        Rejection::new(
            RejectReason::Malformed,
            format!("header {name} is not visible ASCII"),
        )
    })
}

fn normalize(notification: Value, resource: Value) -> Outcome<Verified> {
    let event = notification
        .get("event_type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let get = |name: &str| {
        resource
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let required = |name: &str| {
        get(name).ok_or_else(|| {
            Rejection::new(RejectReason::Malformed, format!("resource has no {name}"))
        })
    };
    let mch_id = get("mchid")
        .or_else(|| get("sp_mchid"))
        .unwrap_or_default()
        .to_string();
    let amount_of = |field: &str| -> Outcome<Option<Amount>> {
        let Some(amount) = resource.get("amount") else {
            return Ok(None);
        };
        let value = amount
            .get(field)
            .and_then(Value::as_i64)
            .filter(|v| *v >= 0)
            .ok_or_else(|| {
                Rejection::new(
                    RejectReason::Malformed,
                    format!("resource.amount.{field} is not an amount in fen"),
                )
            })?;
        Ok(Some(Amount {
            value,
            original: value.to_string(),
            currency: amount
                .get("currency")
                .and_then(Value::as_str)
                .unwrap_or("CNY")
                .to_string(),
        }))
    };
    let (event_type, dedup_key, status, amount, refund_id, platform_refund_id) =
        if let Some(kind) = event.strip_prefix("TRANSACTION.") {
            let state = required("trade_state")?;
            let event_type = match state {
                "SUCCESS" => EventType::PaymentSucceeded,
                "CLOSED" | "REVOKED" => EventType::PaymentClosed,
                "PAYERROR" => EventType::PaymentFailed,
                "NOTPAY" | "USERPAYING" => EventType::PaymentPending,
                other => {
                    return Err(Rejection::new(
                        RejectReason::UnsupportedEvent,
                        format!("{event} with trade_state {other} ({kind})"),
                    ));
                }
            };
            let txn = get("transaction_id")
                .or_else(|| get("out_trade_no"))
                .unwrap_or_default();
            (
                event_type,
                format!("wechatpay-v3|{mch_id}|{txn}|{state}"),
                state,
                amount_of("total")?,
                None,
                None,
            )
        } else if event.starts_with("REFUND.") {
            let state = required("refund_status")?;
            let event_type = match state {
                "SUCCESS" => EventType::RefundSucceeded,
                "ABNORMAL" => EventType::RefundAbnormal,
                "CLOSED" => EventType::RefundClosed,
                other => {
                    return Err(Rejection::new(
                        RejectReason::UnsupportedEvent,
                        format!("refund_status {other}"),
                    ));
                }
            };
            let refund = required("refund_id")?;
            (
                event_type,
                format!("wechatpay-v3|{mch_id}|refund|{refund}|{state}"),
                state,
                amount_of("refund")?,
                get("out_refund_no").map(str::to_string),
                Some(refund.to_string()),
            )
        } else {
            return Err(Rejection::new(
                RejectReason::UnsupportedEvent,
                format!("event_type {event:?}"),
            ));
        };
    let occurred_at = get("success_time")
        .or_else(|| notification.get("create_time").and_then(Value::as_str))
        .map(str::to_string);
    let mut outer = notification;
    if let Some(r) = outer.get_mut("resource").and_then(Value::as_object_mut) {
        r.remove("ciphertext");
    }
    let mut data = Map::new();
    data.insert("notification".into(), outer);
    let order_id = get("out_trade_no").map(str::to_string);
    let transaction_id = get("transaction_id").map(str::to_string);
    let status = status.to_string();
    data.insert("resource".into(), resource);
    Ok(Verified {
        event_type,
        dedup_key,
        amount,
        order_id,
        transaction_id,
        refund_id,
        platform_refund_id,
        status,
        occurred_at,
        data: EventData::Json(data),
    })
}
