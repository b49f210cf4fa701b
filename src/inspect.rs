//! `paynotify verify`: replays one captured notification through the same adapter code
//! the ingress runs, recording every step, and explains the verdict.

use crate::crypto::{self, RsaDiagnosis, RsaHash};
use crate::keys::RsaPublicKey;
use crate::provider::alipay::{Alipay, AlipaySignType};
use crate::provider::wechatpay_v2::{WechatPayV2, WechatV2SignType};
use crate::provider::wechatpay_v3::{DEFAULT_MAX_CLOCK_SKEW_SECS, WechatPayV3};
use crate::provider::{Incoming, Outcome, ProviderKind, RejectReason, Trace, Verified};
use std::fmt::Write as _;

/// What to verify and with which keys (already read from files).
#[derive(Debug, Clone)]
pub struct VerifyRequest {
    /// The platform.
    pub provider: ProviderKind,
    /// Alipay: the public key or certificate. v2: the API key. v3: platform certificates or
    /// the public key.
    pub keys: Vec<Vec<u8>>,
    /// Alipay `RSA2`/`RSA`, v2 `MD5`/`HMAC-SHA256`; the platform default when absent.
    pub sign_type: Option<String>,
    /// If given, the app id is checked too.
    pub app_id: Option<String>,
    /// If given, the merchant id is checked too.
    pub mch_id: Option<String>,
    /// v3 public-key mode: the `PUB_KEY_ID_…` of the single key.
    pub public_key_id: Option<String>,
    /// v3: the APIv3 key.
    pub api_v3_key: Option<Vec<u8>>,
    /// Alipay certificate mode: the root bundle, to print `alipay_root_cert_sn`.
    pub root_certificate: Option<Vec<u8>>,
    /// Request headers (v3).
    pub headers: http::HeaderMap,
    /// The exact body.
    pub body: Vec<u8>,
    /// The time to check against (unix seconds).
    pub now: i64,
    /// v3 window in seconds.
    pub max_clock_skew: Option<i64>,
}

/// Why `verify` could not even start.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Bad arguments or key material.
    #[error("{0}")]
    Setup(String),
}

/// The recorded steps and the verdict.
#[derive(Debug, Default)]
pub struct Inspection {
    fields: Vec<(String, String)>,
    signed: Option<Vec<u8>>,
    algorithm: Option<String>,
    notes: Vec<String>,
    rsa: Option<(Vec<u8>, RsaHash, Vec<u8>)>,
}

impl Trace for Inspection {
    const ENABLED: bool = true;
    fn field(&mut self, name: &str, value: &str) {
        self.fields.push((name.to_string(), value.to_string()));
    }
    fn signed_message(&mut self, message: &[u8]) {
        self.signed = Some(message.to_vec());
    }
    fn algorithm(&mut self, name: &str) {
        self.algorithm = Some(name.to_string());
    }
    fn note(&mut self, note: String) {
        self.notes.push(note);
    }
    fn rsa_check(&mut self, spki_der: &[u8], hash: RsaHash, signature: &[u8]) {
        self.rsa = Some((spki_der.to_vec(), hash, signature.to_vec()));
    }
}

/// Runs the check; returns the report and whether the request verifies.
pub fn verify(req: &VerifyRequest) -> Result<(String, bool), VerifyError> {
    let setup = |e: String| VerifyError::Setup(e);
    let incoming = Incoming {
        headers: &req.headers,
        body: &req.body,
        now: req.now,
    };
    let mut trace = Inspection::default();
    let mut header = Vec::new();
    let verdict: Outcome<Verified> = match req.provider {
        ProviderKind::Alipay => {
            let key = single(&req.keys, "an Alipay public key or certificate")?;
            let sign_type = match req.sign_type.as_deref().unwrap_or("RSA2") {
                "RSA2" => AlipaySignType::Rsa2,
                "RSA" => AlipaySignType::Rsa,
                other => {
                    return Err(setup(format!(
                        "--sign-type for Alipay is RSA2 or RSA, not {other}"
                    )));
                }
            };
            let adapter = Alipay::new(
                req.app_id.clone(),
                sign_type,
                key,
                req.root_certificate.as_deref(),
            )
            .map_err(|e| setup(format!("key: {e}")))?;
            describe_key(&mut header, adapter.key());
            if let Some(sn) = adapter.root_cert_sn() {
                header.push(format!("alipay_root_cert_sn: {sn}"));
            }
            adapter.run(&incoming, &mut trace)
        }
        ProviderKind::WechatPayV2 => {
            let key = single(&req.keys, "the API key")?;
            let sign_type = match req.sign_type.as_deref().unwrap_or("MD5") {
                "MD5" => WechatV2SignType::Md5,
                "HMAC-SHA256" => WechatV2SignType::HmacSha256,
                other => {
                    return Err(setup(format!(
                        "--sign-type for WeChat Pay v2 is MD5 or HMAC-SHA256, not {other}"
                    )));
                }
            };
            let adapter = WechatPayV2::new(req.app_id.clone(), req.mch_id.clone(), sign_type, key)
                .map_err(|e| setup(format!("key: {e}")))?;
            adapter.run(&incoming, &mut trace)
        }
        ProviderKind::WechatPayV3 => {
            let api_v3_key = req.api_v3_key.as_deref().ok_or_else(|| {
                setup("WeChat Pay APIv3 needs --api-v3-key to decrypt the resource".into())
            })?;
            if req.keys.is_empty() {
                return Err(setup(
                    "give the platform certificate(s) or the public key with --key".into(),
                ));
            }
            let public_key = match &req.public_key_id {
                Some(id) => Some((
                    id.as_str(),
                    single(&req.keys, "one public key with --public-key-id")?,
                )),
                None => None,
            };
            let certs = if public_key.is_some() {
                Vec::new()
            } else {
                req.keys.clone()
            };
            let adapter = WechatPayV3::new(
                req.mch_id.clone(),
                req.app_id.clone(),
                api_v3_key,
                &certs,
                public_key,
                req.max_clock_skew.unwrap_or(DEFAULT_MAX_CLOCK_SKEW_SECS),
            )
            .map_err(|e| setup(e.to_string()))?;
            let mut serials: Vec<_> = adapter.keys().collect();
            serials.sort_by_key(|(s, _)| *s);
            for (serial, key) in serials {
                header.push(format!("configured serial {serial}:"));
                describe_key(&mut header, &key.key);
            }
            adapter.run(&incoming, &mut trace)
        }
    };
    Ok(render(req, &header, &trace, &verdict))
}

fn single<'a>(keys: &'a [Vec<u8>], what: &str) -> Result<&'a [u8], VerifyError> {
    match keys {
        [one] => Ok(one),
        _ => Err(VerifyError::Setup(format!(
            "give exactly one --key: {what}"
        ))),
    }
}

fn describe_key(out: &mut Vec<String>, key: &RsaPublicKey) {
    out.push(format!(
        "  key fingerprint: {} ({} bits, given as {:?})",
        key.fingerprint(),
        key.bits(),
        key.format
    ));
    if let Some(cert) = &key.certificate {
        out.push(format!(
            "  certificate serial: {} (decimal {})",
            cert.serial_hex, cert.serial_decimal
        ));
        out.push(format!("  certificate subject: {}", cert.subject));
        out.push(format!("  certificate issuer: {}", cert.issuer));
        out.push(format!("  alipay_cert_sn: {}", cert.alipay_sn));
        out.push(format!(
            "  valid: {} .. {}",
            crate::event::rfc3339_utc(cert.not_before),
            crate::event::rfc3339_utc(cert.not_after)
        ));
    }
}

/// Shows bytes exactly: printable text as is, everything else escaped.
fn show_bytes(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if std::str::from_utf8(bytes).is_ok() {
        text.escape_debug().to_string()
    } else {
        bytes
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) && b != b'\\' {
                    (b as char).to_string()
                } else {
                    format!("\\x{b:02x}")
                }
            })
            .collect()
    }
}

fn render(
    req: &VerifyRequest,
    header: &[String],
    t: &Inspection,
    verdict: &Outcome<Verified>,
) -> (String, bool) {
    let mut out = String::new();
    let _ = writeln!(out, "provider: {}", req.provider.as_str());
    for line in header {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "parsed fields:");
    for (k, v) in &t.fields {
        let _ = writeln!(out, "  {k} = {}", v.escape_debug());
    }
    if let Some(alg) = &t.algorithm {
        let _ = writeln!(out, "algorithm: {alg}");
    }
    for note in &t.notes {
        let _ = writeln!(out, "{note}");
    }
    if let Some(signed) = &t.signed {
        let _ = writeln!(
            out,
            "signed string ({} bytes, shown escaped):\n  \"{}\"",
            signed.len(),
            show_bytes(signed)
        );
    }
    match verdict {
        Ok(v) => {
            let _ = writeln!(out, "verdict: VERIFIED");
            let _ = writeln!(
                out,
                "event: {} {} amount={:?} order={:?}",
                v.event_type.as_str(),
                v.status,
                v.amount.as_ref().map(|a| a.value),
                v.order_id
            );
            (out, true)
        }
        Err(rejection) => {
            let _ = writeln!(
                out,
                "verdict: REJECTED ({}): {}",
                rejection.reason.as_str(),
                rejection.detail
            );
            let _ = writeln!(
                out,
                "most likely reason: {}",
                likely_reason(req, t, rejection.reason)
            );
            (out, false)
        }
    }
}

fn likely_reason(req: &VerifyRequest, t: &Inspection, reason: RejectReason) -> String {
    if reason == RejectReason::BadSignature {
        if let (Some((spki, hash, sig)), Some(signed)) = (&t.rsa, &t.signed) {
            return match crypto::diagnose_rsa(spki, *hash, signed, sig) {
                RsaDiagnosis::WrongKey => "wrong key: this signature was not made with the key you gave. For Alipay use the Alipay public key (not your app's public key); for WeChat Pay use the certificate or public key whose serial is in Wechatpay-Serial.".into(),
                RsaDiagnosis::ContentChanged => "body changed: the key did sign this notification, but over different bytes. Something re-encoded, decoded twice, trimmed or reordered the body (or dropped a parameter) before verification.".into(),
                RsaDiagnosis::OtherHash(h) => format!("wrong sign type: the platform signed with {}, the check used {}.", h.algorithm_name(), hash.algorithm_name()),
                RsaDiagnosis::WrongLength { got, want } => format!("mangled signature: {got} bytes where the key needs {want}; was it truncated, or did '+' become a space when it was copied?"),
                RsaDiagnosis::Valid => "the signature verifies with this key; the notification was refused for another reason.".into(),
            };
        }
        if req.provider == ProviderKind::WechatPayV2 {
            return "wrong API key, wrong sign type, or the body was changed: MD5/HMAC signatures cannot tell these apart. Check the API key in the merchant platform, then the sign type of the order.".into();
        }
        return "the signature is not valid base64 or is a WeChat signature probe.".into();
    }
    match reason {
        RejectReason::StaleTimestamp => "stale timestamp: the notification's Wechatpay-Timestamp is too far from now. For a captured request, pass --now with its timestamp.".into(),
        RejectReason::UnknownSerial => "unknown serial: no configured key has the serial in Wechatpay-Serial (or its certificate is not valid now). Download the current platform certificates, or use the public key with its PUB_KEY_ID_ id.".into(),
        RejectReason::SignTypeMismatch => "wrong sign type: the notification and the route name different signature types.".into(),
        RejectReason::MerchantMismatch => "the notification is for another app or merchant id than the one given.".into(),
        RejectReason::DecryptFailed => "decryption failed: wrong API key (v2 refunds) or APIv3 key, or the ciphertext was altered.".into(),
        RejectReason::MissingSignature => "the notification carries no signature: was the body or header cut off?".into(),
        RejectReason::DuplicateField => "a field appears twice: this is not how the platform sends it.".into(),
        RejectReason::XmlDtd => "the XML carries a DTD or entity: the platforms never send one.".into(),
        RejectReason::InvalidUtf8 => "invalid UTF-8 where UTF-8 is declared: was the body re-encoded?".into(),
        RejectReason::UnsupportedEvent => "verified, but of a kind paynotify does not route (not a payment or refund notification).".into(),
        RejectReason::EmptyBody => "the body file is empty.".into(),
        RejectReason::Oversize | RejectReason::Malformed | RejectReason::BadSignature => {
            "the body does not parse as this platform's notification: is it the right provider and the raw body?".into()
        }
    }
}

/// Parses a header file: `Name: value` lines; an HTTP status line and blank lines are skipped.
pub fn parse_headers(text: &str) -> Result<http::HeaderMap, VerifyError> {
    let mut map = http::HeaderMap::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with("HTTP/") || line.starts_with("POST ") {
            continue;
        }
        let (name, value) = line.split_once(':').ok_or_else(|| {
            VerifyError::Setup(format!("header line {line:?} is not Name: value"))
        })?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| VerifyError::Setup(format!("bad header name {name:?}")))?;
        let value = http::HeaderValue::from_str(value.trim())
            .map_err(|_| VerifyError::Setup(format!("bad value for header {name}")))?;
        map.append(name, value);
    }
    Ok(map)
}
