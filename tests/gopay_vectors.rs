//! The adapters against the GoPay-derived and synthetic vectors in `tests/vectors/gopay/`
//! (copied from the project's shared research; see each file's `description`).

mod support;

use paynotify::crypto::{self, RsaHash};
use paynotify::keys::{self, RsaPublicKey};
use paynotify::provider::alipay::{self, Alipay, AlipaySignType};
use paynotify::provider::wechatpay_v2::{self, WechatPayV2, WechatV2SignType};
use paynotify::provider::wechatpay_v3::WechatPayV3;
use paynotify::provider::{Adapter, Incoming, RejectReason};
use serde_json::Value;

fn vector(name: &str) -> Value {
    let path = format!(
        "{}/tests/vectors/gopay/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    path.split('.')
        .fold(v, |v, k| &v[k])
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string"))
}

fn incoming<'a>(headers: &'a http::HeaderMap, body: &'a [u8], now: i64) -> Incoming<'a> {
    Incoming { headers, body, now }
}

#[test]
fn alipay_certificate_sns_match_gopay() {
    for name in ["alipay_cert_sn_2019_certs", "alipay_cert_sn_current_certs"] {
        let v = vector(name);
        for (cert, sn, idx) in [
            ("alipay_public_cert_pem", "alipay_cert_sn", 0),
            ("app_public_cert_pem", "app_cert_sn", 1),
        ] {
            let info =
                keys::parse_certificate_pem(s(&v, &format!("inputs.{cert}")).as_bytes()).unwrap();
            assert_eq!(
                info.alipay_sn,
                s(&v, &format!("expected.{sn}")),
                "{name} {cert}"
            );
            assert_eq!(
                info.issuer,
                v["expected"]["issuer_strings"][idx].as_str().unwrap()
            );
            if let Some(serials) = v["expected"].get("serials_decimal") {
                assert_eq!(info.serial_decimal, serials[idx].as_str().unwrap());
            }
        }
    }
}

#[test]
fn alipay_root_certificate_sn_skips_sm2_and_ecdsa() {
    let v = vector("alipay_root_cert_sn");
    let sn = keys::alipay_root_cert_sn(s(&v, "inputs.alipay_root_cert_pem").as_bytes()).unwrap();
    assert_eq!(sn, s(&v, "expected.alipay_root_cert_sn"));
}

#[test]
fn tenpay_subject_prints_in_go_order_not_der_order() {
    let v = vector("wechat_v3_verify_signature");
    let info =
        keys::parse_certificate_pem(s(&v, "inputs.platform_certificate_pem").as_bytes()).unwrap();
    assert_eq!(
        info.subject,
        "CN=Tenpay.com sign,OU=Tenpay.com CA Center,O=Tenpay.com,L=ShenZhen,C=CN"
    );
    assert_eq!(
        info.serial_hex,
        s(&v, "expected.certificate_serial_hex_upper")
    );
    assert_eq!(
        paynotify::event::rfc3339_utc(info.not_after),
        "2025-12-16T09:36:37Z"
    );
}

#[test]
fn alipay_rsa2_primitive_verifies_with_raw_and_pem_keys() {
    let v = vector("alipay_sync_rsa2_verify");
    let sig = crypto::base64_decode(s(&v, "inputs.sign").as_bytes()).unwrap();
    for key in [
        "alipay_public_key_raw",
        "alipay_public_key_pem_as_gopay_formats_it",
    ] {
        let k = RsaPublicKey::parse(s(&v, &format!("inputs.{key}")).as_bytes()).unwrap();
        let verifier = k.verifier(RsaHash::Sha256, 2048).unwrap();
        assert!(
            verifier.verify(s(&v, "inputs.sign_data").as_bytes(), &sig),
            "{key}"
        );
        assert!(!verifier.verify(b"{}", &sig));
    }
}

#[test]
fn alipay_sign_strings_match_when_no_value_is_empty() {
    for name in [
        "alipay_async_notify_doc_example",
        "alipay_async_notify_sample_unverifiable",
    ] {
        let v = vector(name);
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = v["inputs"]["params"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, val)| {
                (
                    k.as_bytes().to_vec(),
                    val.as_str().unwrap().as_bytes().to_vec(),
                )
            })
            .collect();
        assert_eq!(
            String::from_utf8(alipay::sign_content(&pairs)).unwrap(),
            s(&v, "expected.sign_string"),
            "{name}"
        );
    }
}

/// GoPay leaves empty values out of the Alipay sign string; the official SDKs (and
/// paynotify) keep them. The synthetic vectors carry `body=` and were signed the GoPay way:
/// as sent they are refused, and without the empty parameter they verify byte for byte.
fn alipay_form_vector(name: &str, sign_type: AlipaySignType) {
    let v = vector(name);
    let adapter = Adapter::Alipay(
        Alipay::new(
            Some("2021000000000001".into()),
            sign_type,
            s(&v, "inputs.alipay_public_key_pem").as_bytes(),
            None,
        )
        .unwrap(),
    );
    let headers = http::HeaderMap::new();
    let body = s(&v, "inputs.raw_body");
    let refused = adapter
        .authenticate(&incoming(&headers, body.as_bytes(), 0))
        .unwrap_err();
    assert_eq!(refused.reason, RejectReason::BadSignature, "{name}");
    let without_empty = body.replace("&body=&", "&");
    assert_ne!(without_empty, body);
    let ok = adapter
        .authenticate(&incoming(&headers, without_empty.as_bytes(), 0))
        .unwrap();
    assert_eq!(ok.event_type.as_str(), "payment.succeeded");
    assert_eq!(ok.amount.as_ref().unwrap().value, 1);
    assert_eq!(ok.order_id.as_deref(), Some("GOPAY-RESEARCH-0001"));
    // The sign string differs from GoPay's only by the empty parameter.
    let params: Vec<(Vec<u8>, Vec<u8>)> = body
        .split('&')
        .map(|p| {
            let (k, val) = p.split_once('=').unwrap();
            (k.as_bytes().to_vec(), unescape(val))
        })
        .collect();
    let ours = alipay::sign_content(&params);
    let gopay_hex = v["expected"].get("sign_string_hex").and_then(Value::as_str);
    let gopay: Vec<u8> = match gopay_hex {
        Some(hex) => from_hex(hex),
        None => s(&v, "expected.sign_string").as_bytes().to_vec(),
    };
    let pos = ours.windows(7).position(|w| w == b"&body=&").unwrap();
    let mut ours_without = ours.clone();
    ours_without.drain(pos..pos + 6);
    assert_eq!(ours_without, gopay, "{name}");
    // And the data handed downstream is UTF-8 text, whatever the wire charset.
    assert!(
        ok.data
            .to_value()
            .as_object()
            .unwrap()
            .values()
            .all(Value::is_string)
    );
    if let Some(subject) = v["expected"]
        .get("subject_gbk_decoded")
        .and_then(Value::as_str)
    {
        assert_eq!(ok.data.to_value()["subject"], subject);
    } else {
        assert_eq!(
            ok.data.to_value()["passback_params"],
            v["expected"]["parsed_params"]["passback_params"]
        );
        assert_eq!(
            ok.data.to_value()["fund_bill_list"],
            v["expected"]["parsed_params"]["fund_bill_list"]
        );
        assert_eq!(
            ok.data.to_value()["seller_email"],
            "shop+notify@example.com"
        );
    }
}

fn unescape(v: &str) -> Vec<u8> {
    let b = v.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                out.push(u8::from_str_radix(&v[i + 1..i + 3], 16).unwrap());
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    out
}

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn alipay_synthetic_rsa2_form() {
    alipay_form_vector("synthetic_alipay_rsa2_notify_form", AlipaySignType::Rsa2);
}

#[test]
fn alipay_synthetic_rsa_sha1_form() {
    alipay_form_vector("synthetic_alipay_rsa_sha1_notify_form", AlipaySignType::Rsa);
}

#[test]
fn alipay_synthetic_gbk_form() {
    alipay_form_vector("synthetic_alipay_rsa2_notify_gbk", AlipaySignType::Rsa2);
}

#[test]
fn wechat_v2_small_sign_string_md5_and_hmac() {
    let v = vector("wechat_v2_md5_sign_small");
    let fields: Vec<(String, String)> = v["inputs"]["fields"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, val)| (k.clone(), val.as_str().unwrap().to_string()))
        .collect();
    let content = wechatpay_v2::sign_content(&fields, b"ABCDEFG");
    assert_eq!(
        String::from_utf8(content.clone()).unwrap(),
        s(&v, "expected.sign_string")
    );
    assert_eq!(
        crypto::hex_upper(&crypto::md5(&content)),
        s(&v, "expected.md5_upper")
    );
    assert_eq!(
        crypto::hex_upper(&crypto::hmac_sha256(b"ABCDEFG", &content)),
        s(&v, "expected.hmac_sha256_upper_researcher_computed")
    );
}

#[test]
fn wechat_v2_synthetic_pay_notifications_verify() {
    for (name, sign_type) in [
        ("synthetic_wechat_v2_pay_notify_md5", WechatV2SignType::Md5),
        (
            "synthetic_wechat_v2_pay_notify_hmac_sha256",
            WechatV2SignType::HmacSha256,
        ),
    ] {
        let v = vector(name);
        let parsed = &v["expected"]["parsed_fields"];
        let adapter = Adapter::WechatPayV2(
            WechatPayV2::new(
                Some(parsed["appid"].as_str().unwrap().into()),
                Some(parsed["mch_id"].as_str().unwrap().into()),
                sign_type,
                s(&v, "inputs.api_key").as_bytes(),
            )
            .unwrap(),
        );
        let headers = http::HeaderMap::new();
        let ok = adapter
            .authenticate(&incoming(&headers, s(&v, "inputs.raw_body").as_bytes(), 0))
            .unwrap();
        assert_eq!(ok.event_type.as_str(), "payment.succeeded", "{name}");
        for (k, val) in parsed.as_object().unwrap() {
            if k != "sign" {
                assert_eq!(&ok.data.to_value()[k], val, "{name} {k}");
            }
        }
        assert_eq!(adapter.success().body, s(&v, "expected.ack_response_body"));
        // The other algorithm on the same route is refused.
        let other = if sign_type == WechatV2SignType::Md5 {
            WechatV2SignType::HmacSha256
        } else {
            WechatV2SignType::Md5
        };
        let wrong =
            WechatPayV2::new(None, None, other, s(&v, "inputs.api_key").as_bytes()).unwrap();
        let err = Adapter::WechatPayV2(wrong)
            .authenticate(&incoming(&headers, s(&v, "inputs.raw_body").as_bytes(), 0))
            .unwrap_err();
        assert_eq!(err.reason, RejectReason::SignTypeMismatch, "{name}");
    }
}

#[test]
fn wechat_v2_refund_req_info_decrypts() {
    let v = vector("wechat_v2_refund_req_info");
    let api_key = s(&v, "inputs.api_key");
    assert_eq!(
        crypto::hex_lower(&crypto::md5(api_key.as_bytes())),
        s(&v, "expected.aes_key_ascii")
    );
    let cipher = crypto::base64_decode(s(&v, "inputs.req_info").as_bytes()).unwrap();
    let plain =
        crypto::aes256_ecb_decrypt(s(&v, "expected.aes_key_ascii").as_bytes(), &cipher).unwrap();
    assert_eq!(
        String::from_utf8(plain).unwrap(),
        s(&v, "expected.plaintext_xml")
    );

    let body = format!(
        "<xml><return_code>SUCCESS</return_code><appid><![CDATA[wx2421b1c4370ec43b]]></appid><mch_id><![CDATA[10000100]]></mch_id><nonce_str><![CDATA[TeqClE3i0mvn3DrK]]></nonce_str><req_info><![CDATA[{}]]></req_info></xml>",
        s(&v, "inputs.req_info")
    );
    let adapter = Adapter::WechatPayV2(
        WechatPayV2::new(
            Some("wx2421b1c4370ec43b".into()),
            Some("10000100".into()),
            WechatV2SignType::Md5,
            api_key.as_bytes(),
        )
        .unwrap(),
    );
    let headers = http::HeaderMap::new();
    let ok = adapter
        .authenticate(&incoming(&headers, body.as_bytes(), 0))
        .unwrap();
    assert_eq!(ok.event_type.as_str(), "refund.succeeded");
    assert_eq!(ok.amount.as_ref().unwrap().value, 6);
    assert_eq!(
        ok.platform_refund_id.as_deref(),
        Some("50000404922017112502468056157")
    );
    for (k, val) in v["expected"]["fields"].as_object().unwrap() {
        assert_eq!(&ok.data.to_value()["req_info"][k], val, "{k}");
    }
    // Another API key decrypts to garbage, which strict padding and XML checks catch.
    let other = Adapter::WechatPayV2(
        WechatPayV2::new(
            None,
            None,
            WechatV2SignType::Md5,
            b"00000000000000000000000000000000",
        )
        .unwrap(),
    );
    assert_eq!(
        other
            .authenticate(&incoming(&headers, body.as_bytes(), 0))
            .unwrap_err()
            .reason,
        RejectReason::DecryptFailed
    );
}

#[test]
fn wechat_v3_real_platform_signature_verifies_by_serial() {
    let v = vector("wechat_v3_verify_signature");
    let cert = s(&v, "inputs.platform_certificate_pem").as_bytes().to_vec();
    let adapter = Adapter::WechatPayV3(
        WechatPayV3::new(None, None, &[b'k'; 32], &[cert], None, 300).unwrap(),
    );
    let headers = support::header_map(&v["inputs"]["headers"]);
    let now: i64 = s(&v, "inputs.headers.Wechatpay-Timestamp").parse().unwrap();
    let body = s(&v, "inputs.body").as_bytes();
    // The signature passes; the body is a synchronous response, not a notification.
    let err = adapter
        .authenticate(&incoming(&headers, body, now))
        .unwrap_err();
    assert_eq!(
        (err.reason, err.detail.as_str()),
        (RejectReason::Malformed, "no resource object")
    );
    let tampered = adapter
        .authenticate(&incoming(&headers, b"{\"code_url\":\"x\"}", now))
        .unwrap_err();
    assert_eq!(tampered.reason, RejectReason::BadSignature);
    // Replayed years later, the signed timestamp is far outside the window.
    assert_eq!(
        adapter
            .authenticate(&incoming(&headers, body, 1_800_000_000))
            .unwrap_err()
            .reason,
        RejectReason::StaleTimestamp
    );
}

#[test]
fn wechat_v3_gcm_malformed_inputs_fail() {
    let v = vector("wechat_v3_aes_gcm_malformed_inputs");
    let key = s(&v, "inputs.api_v3_key").as_bytes();
    let aad = s(&v, "inputs.associated_data").as_bytes();
    let ct = crypto::base64_decode(s(&v, "inputs.case_bad_nonce.ciphertext").as_bytes()).unwrap();
    for nonce in v["inputs"]["case_bad_nonce"]["nonces"].as_array().unwrap() {
        assert!(
            crypto::aes256_gcm_open(key, nonce.as_str().unwrap().as_bytes(), aad, &ct).is_err()
        );
    }
    let nonce = s(&v, "inputs.case_bad_ciphertext.nonce").as_bytes();
    for c in v["inputs"]["case_bad_ciphertext"]["ciphertexts"]
        .as_array()
        .unwrap()
    {
        let bytes = crypto::base64_decode(c.as_str().unwrap().as_bytes()).unwrap_or_default();
        assert!(crypto::aes256_gcm_open(key, nonce, aad, &bytes).is_err());
    }
}

#[test]
fn wechat_v3_public_key_mode_notification() {
    let v = vector("synthetic_wechat_v3_notify_pubkey_mode");
    let adapter = Adapter::WechatPayV3(
        WechatPayV3::new(
            Some("1900000001".into()),
            Some("wx0000000000000001".into()),
            s(&v, "inputs.api_v3_key").as_bytes(),
            &[],
            Some((
                s(&v, "inputs.wechatpay_public_key_id"),
                s(&v, "inputs.wechatpay_public_key_pem").as_bytes(),
            )),
            300,
        )
        .unwrap(),
    );
    let headers = support::header_map(&v["inputs"]["headers"]);
    let now: i64 = s(&v, "inputs.headers.Wechatpay-Timestamp").parse().unwrap();
    let body = s(&v, "inputs.raw_body").as_bytes();
    let ok = adapter
        .authenticate(&incoming(&headers, body, now + 299))
        .unwrap();
    let expected: Value = serde_json::from_str(s(&v, "expected.decrypted_resource")).unwrap();
    assert_eq!(ok.data.to_value()["resource"], expected);
    assert_eq!(ok.event_type.as_str(), "payment.succeeded");
    assert_eq!(
        (
            ok.amount.as_ref().unwrap().value,
            ok.transaction_id.as_deref()
        ),
        (1, Some("4200000000000000000000000001"))
    );
    assert_eq!(adapter.success().status, 204);

    let stale = adapter
        .authenticate(&incoming(&headers, body, now + 301))
        .unwrap_err();
    assert_eq!(stale.reason, RejectReason::StaleTimestamp);
    let future = adapter
        .authenticate(&incoming(&headers, body, now - 301))
        .unwrap_err();
    assert_eq!(future.reason, RejectReason::StaleTimestamp);
    let mut probe = headers.clone();
    probe.insert(
        "wechatpay-signature",
        s(&v, "expected.negative_probe.Wechatpay-Signature")
            .parse()
            .unwrap(),
    );
    assert_eq!(
        adapter
            .authenticate(&incoming(&probe, body, now))
            .unwrap_err()
            .reason,
        RejectReason::BadSignature
    );
    let mut unknown = headers.clone();
    unknown.insert(
        "wechatpay-serial",
        "PUB_KEY_ID_0000000000000000000000000000000002"
            .parse()
            .unwrap(),
    );
    assert_eq!(
        adapter
            .authenticate(&incoming(&unknown, body, now))
            .unwrap_err()
            .reason,
        RejectReason::UnknownSerial
    );
}
