//! Platform-side signing, for tests and benchmarks only (feature `signer`): it produces
//! notifications the way Alipay and WeChat Pay do, with throwaway keys. The third-party
//! fixtures in `tests/fixtures` check the adapters against code we did not write; this
//! signer makes the many fresh, unique notifications that load tests and rotation tests need.

use crate::crypto;
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

/// An RSA-2048 key pair standing in for a platform's signing key.
pub struct PlatformKey {
    pair: RsaKeyPair,
    rng: SystemRandom,
}

/// Why signing failed (only with broken inputs).
#[derive(Debug, thiserror::Error)]
#[error("signer: {0}")]
pub struct SignerError(String);

fn err(e: impl std::fmt::Display) -> SignerError {
    SignerError(e.to_string())
}

impl PlatformKey {
    /// A fresh RSA-2048 key.
    pub fn generate() -> Result<Self, SignerError> {
        let pair = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).map_err(err)?;
        Ok(PlatformKey {
            pair,
            rng: SystemRandom::new(),
        })
    }

    /// The public key as DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Result<Vec<u8>, SignerError> {
        let der: PublicKeyX509Der<'_> = self.pair.public_key().as_der().map_err(err)?;
        Ok(der.as_ref().to_vec())
    }

    /// The public key as the Alipay console shows it: one line of base64 SPKI.
    pub fn spki_base64(&self) -> Result<String, SignerError> {
        Ok(crypto::base64_encode(&self.spki_der()?))
    }

    /// The public key as PEM SPKI.
    pub fn spki_pem(&self) -> Result<String, SignerError> {
        Ok(pem("PUBLIC KEY", &self.spki_der()?))
    }

    /// Base64 SHA256withRSA (PKCS#1 v1.5) signature of `message`.
    pub fn sign_sha256(&self, message: &[u8]) -> Result<String, SignerError> {
        let mut sig = vec![0u8; self.pair.public_modulus_len()];
        self.pair
            .sign(&signature::RSA_PKCS1_SHA256, &self.rng, message, &mut sig)
            .map_err(err)?;
        Ok(crypto::base64_encode(&sig))
    }

    /// A self-signed certificate for this key with `serial`, valid 2020–2040, PEM.
    pub fn certificate(&self, serial: &[u8]) -> Result<String, SignerError> {
        let pkcs8: Pkcs8V1Der<'_> = self.pair.as_der().map_err(err)?;
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &pkcs8.as_ref().to_vec().into(),
            &rcgen::PKCS_RSA_SHA256,
        )
        .map_err(err)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        params
            .distinguished_name
            .push(rcgen::DnType::CountryName, "CN");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Tenpay.com");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Tenpay.com sign");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2040, 1, 1);
        Ok(params.self_signed(&key).map_err(err)?.pem())
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = crypto::base64_encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// `application/x-www-form-urlencoded` escaping as Alipay sends it (space as `+`).
pub fn form_escape(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                (b as char).to_string()
            }
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A signed Alipay RSA2 notification body for `params` (in this order on the wire).
pub fn alipay_form(key: &PlatformKey, params: &[(String, String)]) -> Result<Vec<u8>, SignerError> {
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = params
        .iter()
        .map(|(k, v)| (k.clone().into_bytes(), v.clone().into_bytes()))
        .collect();
    let sig = key.sign_sha256(&crate::provider::alipay::sign_content(&pairs))?;
    let mut form: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", form_escape(v)))
        .collect();
    form.push(format!("sign={}", form_escape(&sig)));
    form.push("sign_type=RSA2".into());
    Ok(form.join("&").into_bytes())
}

/// The parameters of a typical Alipay TRADE_SUCCESS notification for `order` (no empty
/// values, so that GoPay, which drops them, verifies it too).
pub fn alipay_payment_params(app_id: &str, order: &str) -> Vec<(String, String)> {
    [
        ("app_id", app_id),
        ("auth_app_id", app_id),
        ("charset", "utf-8"),
        ("notify_id", &format!("2026120300222{order}")),
        ("notify_time", "2026-12-03 12:00:06"),
        ("notify_type", "trade_status_sync"),
        ("out_trade_no", order),
        ("trade_no", &format!("20261203220014{order}")),
        ("trade_status", "TRADE_SUCCESS"),
        ("total_amount", "12.34"),
        ("receipt_amount", "12.34"),
        ("buyer_id", "2088000000000001"),
        ("seller_id", "2088000000000002"),
        ("subject", "会员 membership"),
        ("gmt_create", "2026-12-03 12:00:00"),
        ("gmt_payment", "2026-12-03 12:00:05"),
        ("version", "1.0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A signed Alipay TRADE_SUCCESS notification for `order`.
pub fn alipay_payment(
    key: &PlatformKey,
    app_id: &str,
    order: &str,
) -> Result<Vec<u8>, SignerError> {
    alipay_form(key, &alipay_payment_params(app_id, order))
}

/// A signed Alipay refund notification for `order` (partial refund `refund_no` of 1.00).
pub fn alipay_refund(
    key: &PlatformKey,
    app_id: &str,
    order: &str,
    refund_no: &str,
) -> Result<Vec<u8>, SignerError> {
    let mut params = alipay_payment_params(app_id, order);
    params.retain(|(k, _)| k != "notify_id");
    params.extend(
        [
            ("notify_id", format!("2026120300333{order}{refund_no}")),
            ("out_biz_no", refund_no.to_string()),
            ("refund_fee", "1.00".to_string()),
            ("gmt_refund", "2026-12-03 13:00:00".to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    alipay_form(key, &params)
}

/// The fields of a WeChat Pay v2 payment notification for `order`, without `sign`.
pub fn wechat_v2_payment_fields(
    hmac: bool,
    app_id: &str,
    mch_id: &str,
    order: &str,
) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = [
        ("appid", app_id),
        ("mch_id", mch_id),
        ("nonce_str", "5d2b6c2a8db53831f7eda20af46e531c"),
        ("result_code", "SUCCESS"),
        ("return_code", "SUCCESS"),
        ("openid", "oBENCHopenid000000000000001"),
        ("out_trade_no", order),
        ("transaction_id", &format!("42000000{order}")),
        ("total_fee", "1234"),
        ("fee_type", "CNY"),
        ("trade_type", "JSAPI"),
        ("bank_type", "OTHERS"),
        ("time_end", "20261203120005"),
        ("is_subscribe", "N"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if hmac {
        fields.push(("sign_type".into(), "HMAC-SHA256".into()));
    }
    fields
}

/// The signed XML body for v2 `fields` (MD5, or HMAC-SHA256 with `hmac`).
pub fn wechat_v2_xml(fields: &[(String, String)], api_key: &str, hmac: bool) -> Vec<u8> {
    let content = crate::provider::wechatpay_v2::sign_content(fields, api_key.as_bytes());
    let sign = if hmac {
        crypto::hex_upper(&crypto::hmac_sha256(api_key.as_bytes(), &content))
    } else {
        crypto::hex_upper(&crypto::md5(&content))
    };
    let mut xml = String::from("<xml>");
    for (k, v) in fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain([("sign", sign.as_str())])
    {
        xml.push_str(&format!("<{k}><![CDATA[{v}]]></{k}>"));
    }
    xml.push_str("</xml>");
    xml.into_bytes()
}

/// A signed WeChat Pay v2 payment notification for `order`.
pub fn wechat_v2_payment(
    api_key: &str,
    hmac: bool,
    app_id: &str,
    mch_id: &str,
    order: &str,
) -> Vec<u8> {
    wechat_v2_xml(
        &wechat_v2_payment_fields(hmac, app_id, mch_id, order),
        api_key,
        hmac,
    )
}

/// A WeChat Pay APIv3 `TRANSACTION.SUCCESS` resource for `order`.
pub fn wechat_v3_transaction(mch_id: &str, order: &str) -> Value {
    json!({
        "mchid": mch_id, "appid": "wx0000000000000001", "out_trade_no": order,
        "transaction_id": format!("42000000{order}"), "trade_type": "JSAPI", "trade_state": "SUCCESS",
        "trade_state_desc": "ok", "bank_type": "OTHERS", "attach": "", "success_time": "2026-12-03T12:00:05+08:00",
        "payer": {"openid": "o-bench"}, "amount": {"total": 1234, "payer_total": 1234, "currency": "CNY", "payer_currency": "CNY"}
    })
}

/// A notification with headers, as the platform sends it.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// A signed, encrypted WeChat Pay APIv3 notification.
pub fn wechat_v3_request(
    key: &PlatformKey,
    serial: &str,
    api_v3_key: &[u8; 32],
    resource: &Value,
    event_type: &str,
    timestamp: i64,
) -> Result<SignedRequest, SignerError> {
    use aws_lc_rs::aead;
    use aws_lc_rs::rand::SecureRandom;
    let mut nonce = [0u8; 12];
    key.rng.fill(&mut nonce).map_err(err)?;
    // WeChat's nonces are 12 printable characters.
    let nonce: [u8; 12] = nonce.map(|b| b"abcdefghijklmnopqrstuvwxyz0123456789"[b as usize % 36]);
    let sealing =
        aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, api_v3_key).map_err(err)?);
    let mut data = serde_json::to_vec(resource).map_err(err)?;
    sealing
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(b"transaction"),
            &mut data,
        )
        .map_err(err)?;
    let id = format!("EV-{timestamp}-{}", crypto::hex_lower(&nonce[..6]));
    let body = serde_json::to_vec(&json!({
        "id": id,
        "create_time": "2026-12-03T12:00:06+08:00",
        "resource_type": "encrypt-resource",
        "event_type": event_type,
        "summary": "支付成功",
        "resource": {
            "original_type": "transaction",
            "algorithm": "AEAD_AES_256_GCM",
            "ciphertext": crypto::base64_encode(&data),
            "associated_data": "transaction",
            "nonce": String::from_utf8_lossy(&nonce),
        }
    }))
    .map_err(err)?;
    let header_nonce = crypto::hex_lower(&crypto::sha256(&body)[..16]);
    let mut message = format!("{timestamp}\n{header_nonce}\n").into_bytes();
    message.extend_from_slice(&body);
    message.push(b'\n');
    let headers = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("wechatpay-timestamp".to_string(), timestamp.to_string()),
        ("wechatpay-nonce".to_string(), header_nonce),
        ("wechatpay-serial".to_string(), serial.to_string()),
        (
            "wechatpay-signature-type".to_string(),
            "WECHATPAY2-SHA256-RSA2048".to_string(),
        ),
        (
            "wechatpay-signature".to_string(),
            key.sign_sha256(&message)?,
        ),
    ];
    Ok(SignedRequest { headers, body })
}
