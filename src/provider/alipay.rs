//! Alipay asynchronous notifications: form POST, RSA2 (SHA256withRSA) or RSA (SHA1withRSA).

use super::{
    Incoming, Outcome, RejectReason, Rejection, TextFields, Trace, Verified, china_time_to_rfc3339,
    form, yuan_to_minor,
};
use crate::crypto::{self, RsaHash, RsaVerifier};
use crate::event::{Amount, EventData, EventType};
use crate::keys::{KeyError, RsaPublicKey};

/// The signature types a route can be configured with.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub enum AlipaySignType {
    /// SHA256withRSA.
    #[serde(rename = "RSA2")]
    Rsa2,
    /// SHA1withRSA (legacy).
    #[serde(rename = "RSA")]
    Rsa,
}

impl AlipaySignType {
    /// The name Alipay uses in `sign_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            AlipaySignType::Rsa2 => "RSA2",
            AlipaySignType::Rsa => "RSA",
        }
    }

    fn hash(self) -> RsaHash {
        match self {
            AlipaySignType::Rsa2 => RsaHash::Sha256,
            AlipaySignType::Rsa => RsaHash::Sha1,
        }
    }

    /// Legacy `RSA` keys from Alipay's console may be 1024 bits; RSA2 keys are 2048.
    fn min_bits(self) -> usize {
        match self {
            AlipaySignType::Rsa2 => 2048,
            AlipaySignType::Rsa => 1024,
        }
    }
}

/// A route's Alipay settings, compiled.
#[derive(Debug)]
pub struct Alipay {
    app_id: Option<String>,
    sign_type: AlipaySignType,
    key: RsaPublicKey,
    verifier: RsaVerifier,
    root_cert_sn: Option<String>,
}

/// The charsets Alipay declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Charset {
    Utf8,
    Gbk,
}

impl Alipay {
    /// Compiles the settings. `app_id` is `None` only for the offline `verify` command.
    pub fn new(
        app_id: Option<String>,
        sign_type: AlipaySignType,
        public_key: &[u8],
        root_certificate: Option<&[u8]>,
    ) -> Result<Self, KeyError> {
        let key = RsaPublicKey::parse(public_key)?;
        let verifier = key.verifier(sign_type.hash(), sign_type.min_bits())?;
        let root_cert_sn = root_certificate
            .map(crate::keys::alipay_root_cert_sn)
            .transpose()?;
        Ok(Alipay {
            app_id,
            sign_type,
            key,
            verifier,
            root_cert_sn,
        })
    }

    /// The verification key.
    pub fn key(&self) -> &RsaPublicKey {
        &self.key
    }

    /// `alipay_root_cert_sn` of the configured root bundle, if one was given.
    pub fn root_cert_sn(&self) -> Option<&str> {
        self.root_cert_sn.as_deref()
    }

    pub(super) fn authenticate(&self, incoming: &Incoming<'_>) -> Outcome<Verified> {
        self.run(incoming, &mut super::NoTrace)
    }

    /// The adapter's pipeline, observed by `trace`.
    pub fn run<T: Trace>(&self, incoming: &Incoming<'_>, trace: &mut T) -> Outcome<Verified> {
        let params = form::parse(incoming.body)?;
        let charset = charset_of(&params)?;
        if T::ENABLED {
            for (k, v) in &params {
                trace.field(&String::from_utf8_lossy(k), &String::from_utf8_lossy(v));
            }
        }
        let sign = lookup(&params, b"sign")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Rejection::new(RejectReason::MissingSignature, "no sign parameter"))?;
        if let Some(declared) = lookup(&params, b"sign_type")
            && declared != self.sign_type.as_str().as_bytes()
        {
            return Err(Rejection::new(
                RejectReason::SignTypeMismatch,
                format!(
                    "notification says sign_type={:?}, the route verifies {}",
                    String::from_utf8_lossy(declared),
                    self.sign_type.as_str()
                ),
            ));
        }
        let content = sign_content(&params);
        if T::ENABLED {
            trace.signed_message(&content);
            trace.algorithm(self.sign_type.hash().algorithm_name());
        }
        let signature = crypto::base64_decode(sign).ok_or_else(|| {
            Rejection::new(RejectReason::BadSignature, "sign is not standard base64")
        })?;
        if T::ENABLED {
            trace.rsa_check(self.key.spki_der(), self.sign_type.hash(), &signature);
        }
        if !self.verifier.verify(&content, &signature) {
            return Err(Rejection::new(
                RejectReason::BadSignature,
                "signature does not verify",
            ));
        }
        // Verified over the raw bytes; only now are they turned into text.
        let text = decode_all(params, charset)?;
        let app_id = text.required("app_id", "the notification")?;
        if let Some(expected) = &self.app_id
            && app_id != expected
        {
            return Err(Rejection::new(
                RejectReason::MerchantMismatch,
                format!("app_id {app_id} is not the route's {expected}"),
            ));
        }
        let verified = normalize(&text, app_id)?;
        Ok(Verified {
            data: EventData::fields(text.into_fields("sign")),
            ..verified
        })
    }
}

fn lookup<'a>(params: &'a form::Form, key: &[u8]) -> Option<&'a [u8]> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_slice())
}

fn charset_of(params: &form::Form) -> Outcome<Charset> {
    match lookup(params, b"charset").map(|c| c.to_ascii_lowercase()) {
        None => Ok(Charset::Utf8),
        Some(c) if c == b"utf-8" || c == b"utf8" => Ok(Charset::Utf8),
        Some(c) if c == b"gbk" || c == b"gb2312" || c == b"gb18030" => Ok(Charset::Gbk),
        Some(c) => Err(Rejection::new(
            RejectReason::Malformed,
            format!("unsupported charset {:?}", String::from_utf8_lossy(&c)),
        )),
    }
}

/// Keys and values as UTF-8 text: checked (and moved, not copied) for `utf-8`, converted
/// for `GBK`.
fn decode_all(params: form::Form, charset: Charset) -> Outcome<TextFields> {
    let decode = |bytes: Vec<u8>| -> Outcome<String> {
        match charset {
            Charset::Utf8 => String::from_utf8(bytes).map_err(|_| {
                Rejection::new(
                    RejectReason::InvalidUtf8,
                    "charset is utf-8 but a value is not UTF-8",
                )
            }),
            Charset::Gbk => encoding_rs::GBK
                .decode_without_bom_handling_and_without_replacement(&bytes)
                .map(|s| s.into_owned())
                .ok_or_else(|| {
                    Rejection::new(
                        RejectReason::Malformed,
                        "charset is GBK but a value is not GBK",
                    )
                }),
        }
    };
    let pairs = params
        .into_iter()
        .map(|(k, v)| Ok((decode(k)?, decode(v)?)));
    pairs.collect::<Outcome<_>>().map(TextFields)
}

/// The signed string: every parameter except `sign` and `sign_type`, empty values included
/// (as the official Alipay SDKs verify), sorted by key bytes, `k=v` joined with `&`.
pub fn sign_content(params: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut pairs: Vec<&(Vec<u8>, Vec<u8>)> = params
        .iter()
        .filter(|(k, _)| k != b"sign" && k != b"sign_type")
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::with_capacity(params.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
    for (i, (k, v)) in pairs.into_iter().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        out.extend_from_slice(k);
        out.push(b'=');
        out.extend_from_slice(v);
    }
    out
}

fn normalize(text: &TextFields, app_id: &str) -> Outcome<Verified> {
    let status = text.get("trade_status").ok_or_else(|| {
        Rejection::new(
            RejectReason::UnsupportedEvent,
            "no trade_status: not a trade notification",
        )
    })?;
    let trade_no = text.required("trade_no", "the notification")?;
    let out_trade_no = text.required("out_trade_no", "the notification")?;
    // Alipay reports refunds as a trade notification carrying the refund's fields.
    let refund_no = text
        .get("out_biz_no")
        .filter(|_| text.get("refund_fee").is_some());
    let event_type = match (refund_no, status) {
        (Some(_), _) => EventType::RefundSucceeded,
        (None, "TRADE_SUCCESS") => EventType::PaymentSucceeded,
        (None, "TRADE_FINISHED") => EventType::PaymentFinished,
        (None, "TRADE_CLOSED") => EventType::PaymentClosed,
        (None, "WAIT_BUYER_PAY") => EventType::PaymentPending,
        (None, other) => {
            return Err(Rejection::new(
                RejectReason::UnsupportedEvent,
                format!("trade_status {other}"),
            ));
        }
    };
    let (amount_field, time_fields): (&str, &[&str]) = match refund_no {
        Some(_) => ("refund_fee", &["gmt_refund", "gmt_close", "notify_time"]),
        None => ("total_amount", &["gmt_close", "gmt_payment", "notify_time"]),
    };
    let amount = text
        .get(amount_field)
        .map(|original| {
            let value = yuan_to_minor(original).ok_or_else(|| {
                Rejection::new(
                    RejectReason::Malformed,
                    format!("{amount_field} is not an amount in yuan"),
                )
            })?;
            let currency = text.get("currency").unwrap_or("CNY").to_string();
            Ok(Amount {
                value,
                original: original.to_string(),
                currency,
            })
        })
        .transpose()?;
    let occurred_at = time_fields
        .iter()
        .find_map(|f| text.get(f).and_then(china_time_to_rfc3339));
    Ok(Verified {
        event_type,
        dedup_key: format!(
            "alipay|{app_id}|{trade_no}|{status}|{}",
            refund_no.unwrap_or("")
        ),
        amount,
        order_id: Some(out_trade_no.to_string()),
        transaction_id: Some(trade_no.to_string()),
        refund_id: refund_no.map(str::to_string),
        platform_refund_id: None,
        status: status.to_string(),
        occurred_at,
        // The fields are moved in by the caller once nothing borrows them any more.
        data: EventData::default(),
    })
}
