//! WeChat Pay API v2 notifications: XML, MD5 or HMAC-SHA256 signatures, and refund
//! notifications whose `req_info` is AES-256-ECB encrypted.

use super::{
    Incoming, Outcome, RejectReason, Rejection, TextFields, Trace, Verified, china_time_to_rfc3339,
    compact_china_time_to_rfc3339, xml,
};
use crate::crypto;
use crate::event::{Amount, EventData, EventType};
use crate::keys::{KeyError, parse_ascii_secret};

/// The signature types a route can be configured with.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub enum WechatV2SignType {
    /// MD5 over the string ending in `key=APIKEY`.
    #[serde(rename = "MD5")]
    Md5,
    /// HMAC-SHA256 keyed with the API key over the same string.
    #[serde(rename = "HMAC-SHA256")]
    HmacSha256,
}

impl WechatV2SignType {
    /// The name WeChat uses in `sign_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            WechatV2SignType::Md5 => "MD5",
            WechatV2SignType::HmacSha256 => "HMAC-SHA256",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            WechatV2SignType::Md5 => 32,
            WechatV2SignType::HmacSha256 => 64,
        }
    }
}

/// WeChat Pay API keys are 32 characters.
const API_KEY_LEN: usize = 32;

/// A route's WeChat Pay v2 settings, compiled.
pub struct WechatPayV2 {
    app_id: Option<String>,
    mch_id: Option<String>,
    sign_type: WechatV2SignType,
    api_key: Vec<u8>,
    refund_key: Vec<u8>,
}

impl std::fmt::Debug for WechatPayV2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WechatPayV2")
            .field("app_id", &self.app_id)
            .field("mch_id", &self.mch_id)
            .field("sign_type", &self.sign_type)
            .finish_non_exhaustive()
    }
}

/// The fixed answer WeChat expects, with CDATA sections.
pub fn answer(code: &str, message: &str) -> String {
    format!(
        "<xml><return_code><![CDATA[{code}]]></return_code><return_msg><![CDATA[{}]]></return_msg></xml>",
        message.replace("]]>", "]]]]><![CDATA[>")
    )
}

impl WechatPayV2 {
    /// Compiles the settings. The ids are `None` only for the offline `verify` command.
    pub fn new(
        app_id: Option<String>,
        mch_id: Option<String>,
        sign_type: WechatV2SignType,
        api_key: &[u8],
    ) -> Result<Self, KeyError> {
        let api_key = parse_ascii_secret(api_key, API_KEY_LEN, "the WeChat Pay API key")?;
        let refund_key = crypto::hex_lower(&crypto::md5(&api_key)).into_bytes();
        Ok(WechatPayV2 {
            app_id,
            mch_id,
            sign_type,
            api_key,
            refund_key,
        })
    }

    /// A short fingerprint of the API key, safe to show.
    pub fn key_fingerprint(&self) -> String {
        format!(
            "SHA256:{}",
            &crypto::hex_lower(&crypto::sha256(&self.api_key))[..16]
        )
    }

    pub(super) fn authenticate(&self, incoming: &Incoming<'_>) -> Outcome<Verified> {
        self.run(incoming, &mut super::NoTrace)
    }

    /// The adapter's pipeline, observed by `trace`.
    pub fn run<T: Trace>(&self, incoming: &Incoming<'_>, trace: &mut T) -> Outcome<Verified> {
        let fields = xml::parse(incoming.body)?;
        fields.trace(trace, "");
        if fields.raw("req_info").is_some() {
            return self.refund(fields, trace);
        }
        let sign = fields
            .get("sign")
            .ok_or_else(|| Rejection::new(RejectReason::MissingSignature, "no sign element"))?;
        if let Some(declared) = fields.get("sign_type")
            && declared != self.sign_type.as_str()
        {
            return Err(Rejection::new(
                RejectReason::SignTypeMismatch,
                format!(
                    "notification says sign_type={declared:?}, the route verifies {}",
                    self.sign_type.as_str()
                ),
            ));
        }
        let content = sign_content(&fields.0, &self.api_key);
        let expected = self.sign(&content);
        if T::ENABLED {
            // Show the signed string without the API key itself.
            let mut masked = content[..content.len() - self.api_key.len()].to_vec();
            masked.extend_from_slice(b"<API key>");
            trace.signed_message(&masked);
            trace.algorithm(match self.sign_type {
                WechatV2SignType::Md5 => "MD5, upper-case hex",
                WechatV2SignType::HmacSha256 => {
                    "HMAC-SHA256 keyed with the API key, upper-case hex"
                }
            });
            trace.note(format!("API key fingerprint: {}", self.key_fingerprint()));
        }
        if !crypto::ct_eq(sign.as_bytes(), expected.as_bytes()) {
            let other = match self.sign_type {
                WechatV2SignType::Md5 => WechatV2SignType::HmacSha256,
                WechatV2SignType::HmacSha256 => WechatV2SignType::Md5,
            };
            if sign.len() == other.hex_len() {
                return Err(Rejection::new(
                    RejectReason::SignTypeMismatch,
                    format!(
                        "the sign has the length of {}, the route verifies {}",
                        other.as_str(),
                        self.sign_type.as_str()
                    ),
                ));
            }
            return Err(Rejection::new(
                RejectReason::BadSignature,
                "signature does not match",
            ));
        }
        self.check_merchant(&fields)?;
        let verified = normalize_payment(&fields)?;
        Ok(Verified {
            data: EventData::fields(fields.into_fields("sign")),
            ..verified
        })
    }

    fn sign(&self, content: &[u8]) -> String {
        match self.sign_type {
            WechatV2SignType::Md5 => crypto::hex_upper(&crypto::md5(content)),
            WechatV2SignType::HmacSha256 => {
                crypto::hex_upper(&crypto::hmac_sha256(&self.api_key, content))
            }
        }
    }

    fn check_merchant(&self, fields: &TextFields) -> Outcome<()> {
        for (name, want) in [("appid", &self.app_id), ("mch_id", &self.mch_id)] {
            let got = fields.raw(name);
            if let Some(want) = want
                && got != Some(want.as_str())
            {
                return Err(Rejection::new(
                    RejectReason::MerchantMismatch,
                    format!("{name} {:?} is not the route's {want}", got.unwrap_or("")),
                ));
            }
        }
        Ok(())
    }

    /// Refund notifications carry no signature: the encrypted `req_info` authenticates them.
    fn refund<T: Trace>(&self, fields: TextFields, trace: &mut T) -> Outcome<Verified> {
        let failed = |detail: String| Rejection::new(RejectReason::DecryptFailed, detail);
        if T::ENABLED {
            trace.algorithm("AES-256-ECB, key = lower-case hex MD5(API key), PKCS#7");
            trace.note(format!("API key fingerprint: {}", self.key_fingerprint()));
        }
        let req_info = fields.raw("req_info").unwrap_or_default();
        let cipher = crypto::base64_decode(req_info.as_bytes())
            .ok_or_else(|| failed("req_info is not base64".into()))?;
        let plain = crypto::aes256_ecb_decrypt(&self.refund_key, &cipher)
            .map_err(|e| failed(format!("req_info: {e}")))?;
        let inner = xml::parse(&plain)
            .map_err(|e| failed(format!("req_info plaintext is not the expected XML: {e}")))?;
        inner.trace(trace, "req_info.");
        if fields.get("return_code") != Some("SUCCESS") {
            return Err(Rejection::new(
                RejectReason::UnsupportedEvent,
                "return_code is not SUCCESS",
            ));
        }
        self.check_merchant(&fields)?;
        let status = inner.required("refund_status", "req_info")?;
        let event_type = match status {
            "SUCCESS" => EventType::RefundSucceeded,
            "CHANGE" => EventType::RefundAbnormal,
            "REFUNDCLOSE" => EventType::RefundClosed,
            other => {
                return Err(Rejection::new(
                    RejectReason::UnsupportedEvent,
                    format!("refund_status {other}"),
                ));
            }
        };
        let refund_id = inner.required("refund_id", "req_info")?;
        let amount = fen_amount(
            inner.required("refund_fee", "req_info")?,
            "CNY",
            "refund_fee",
        )?;
        let mch_id = fields.get("mch_id").unwrap_or_default();
        let verified = Verified {
            event_type,
            dedup_key: format!("wechatpay-v2|{mch_id}|refund|{refund_id}|{status}"),
            amount: Some(amount),
            order_id: inner.get("out_trade_no").map(str::to_string),
            transaction_id: inner.get("transaction_id").map(str::to_string),
            refund_id: inner.get("out_refund_no").map(str::to_string),
            platform_refund_id: Some(refund_id.to_string()),
            status: status.to_string(),
            occurred_at: inner.get("success_time").and_then(china_time_to_rfc3339),
            data: EventData::default(),
        };
        let data = EventData::Fields {
            fields: fields.into_fields("req_info"),
            nested: Some(("req_info", inner.0)),
        };
        Ok(Verified { data, ..verified })
    }
}

/// The signed string: fields sorted by name, empty values and `sign` left out, `k=v`
/// joined with `&`, then `&key=APIKEY`.
pub fn sign_content(fields: &[(String, String)], api_key: &[u8]) -> Vec<u8> {
    let mut pairs: Vec<&(String, String)> = fields
        .iter()
        .filter(|(k, v)| k != "sign" && !v.is_empty())
        .collect();
    pairs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(b'&');
    }
    out.extend_from_slice(b"key=");
    out.extend_from_slice(api_key);
    out
}

fn fen_amount(text: &str, currency: &str, field: &str) -> Outcome<Amount> {
    let value = text
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 0 && text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            Rejection::new(
                RejectReason::Malformed,
                format!("{field} is not an amount in fen"),
            )
        })?;
    Ok(Amount {
        value,
        original: text.to_string(),
        currency: currency.to_string(),
    })
}

fn normalize_payment(fields: &TextFields) -> Outcome<Verified> {
    if fields.get("return_code") != Some("SUCCESS") {
        return Err(Rejection::new(
            RejectReason::UnsupportedEvent,
            "return_code is not SUCCESS",
        ));
    }
    let status = fields.required("result_code", "the notification")?;
    let event_type = match status {
        "SUCCESS" => EventType::PaymentSucceeded,
        "FAIL" => EventType::PaymentFailed,
        other => {
            return Err(Rejection::new(
                RejectReason::UnsupportedEvent,
                format!("result_code {other}"),
            ));
        }
    };
    let out_trade_no = fields.required("out_trade_no", "the notification")?;
    let transaction_id = match event_type {
        EventType::PaymentSucceeded => Some(fields.required("transaction_id", "the notification")?),
        _ => fields.get("transaction_id"),
    };
    let amount = fields
        .get("total_fee")
        .map(|t| fen_amount(t, fields.get("fee_type").unwrap_or("CNY"), "total_fee"))
        .transpose()?;
    let mch_id = fields.required("mch_id", "the notification")?;
    let appid = fields.get("appid").unwrap_or_default();
    Ok(Verified {
        event_type,
        dedup_key: format!(
            "wechatpay-v2|{mch_id}|{appid}|{}|{status}",
            transaction_id.unwrap_or(out_trade_no)
        ),
        amount,
        order_id: Some(out_trade_no.to_string()),
        transaction_id: transaction_id.map(str::to_string),
        refund_id: None,
        platform_refund_id: None,
        status: status.to_string(),
        occurred_at: fields
            .get("time_end")
            .and_then(compact_china_time_to_rfc3339),
        // The fields are moved in by the caller once nothing borrows them any more.
        data: EventData::default(),
    })
}
