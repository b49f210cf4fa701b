//! Microbenchmarks: each adapter's verify path against the raw cryptography it cannot avoid
//! (an aws-lc-rs RSA-2048 verify, HMAC-SHA256 or MD5 over the same bytes, AES-256-GCM).
//! `bench/run.sh` reads the results and reports adapter / raw as a ratio.

use criterion::{Criterion, criterion_group, criterion_main};
use paynotify::crypto::{self, RsaHash, RsaVerifier};
use paynotify::provider::alipay::{self, Alipay, AlipaySignType};
use paynotify::provider::wechatpay_v2::{self, WechatPayV2, WechatV2SignType};
use paynotify::provider::wechatpay_v3::WechatPayV3;
use paynotify::provider::{Adapter, Incoming};
use paynotify::signer::{self, PlatformKey};
use std::hint::black_box;

const API_KEY: &str = "0123456789abcdefghijklmnopqrstuv";
const API_V3_KEY: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz012345";
const NOW: i64 = 1_800_000_000;

fn alipay(c: &mut Criterion) {
    let key = PlatformKey::generate().unwrap();
    let adapter = Adapter::Alipay(
        Alipay::new(
            Some("2021000000000001".into()),
            AlipaySignType::Rsa2,
            key.spki_pem().unwrap().as_bytes(),
            None,
        )
        .unwrap(),
    );
    let body = signer::alipay_payment(&key, "2021000000000001", "BENCH0001").unwrap();
    let headers = http::HeaderMap::new();
    let incoming = Incoming {
        headers: &headers,
        body: &body,
        now: NOW,
    };
    assert!(adapter.authenticate(&incoming).is_ok());
    // The raw cost: one RSA-2048 verify of the very string the adapter verifies.
    let params: Vec<(Vec<u8>, Vec<u8>)> =
        signer::alipay_payment_params("2021000000000001", "BENCH0001")
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
            .collect();
    let content = alipay::sign_content(&params);
    let sig = crypto::base64_decode(key.sign_sha256(&content).unwrap().as_bytes()).unwrap();
    let verifier = RsaVerifier::new(&key.spki_der().unwrap(), RsaHash::Sha256).unwrap();
    assert!(verifier.verify(&content, &sig));
    let mut g = c.benchmark_group("alipay_rsa2");
    g.bench_function("adapter", |b| {
        b.iter(|| adapter.authenticate(black_box(&incoming)).unwrap())
    });
    g.bench_function("raw_crypto", |b| {
        b.iter(|| assert!(verifier.verify(black_box(&content), black_box(&sig))))
    });
    g.finish();
}

fn wechat_v2(c: &mut Criterion) {
    for (name, hmac) in [("wechatpay_v2_md5", false), ("wechatpay_v2_hmac", true)] {
        let sign_type = if hmac {
            WechatV2SignType::HmacSha256
        } else {
            WechatV2SignType::Md5
        };
        let adapter = Adapter::WechatPayV2(
            WechatPayV2::new(
                Some("wx0000000000000001".into()),
                Some("1900000001".into()),
                sign_type,
                API_KEY.as_bytes(),
            )
            .unwrap(),
        );
        let body = signer::wechat_v2_payment(
            API_KEY,
            hmac,
            "wx0000000000000001",
            "1900000001",
            "BENCH0002",
        );
        let headers = http::HeaderMap::new();
        let incoming = Incoming {
            headers: &headers,
            body: &body,
            now: NOW,
        };
        assert!(adapter.authenticate(&incoming).is_ok());
        // The raw cost: the digest over the exact string the adapter builds.
        let fields =
            signer::wechat_v2_payment_fields(hmac, "wx0000000000000001", "1900000001", "BENCH0002");
        let content = wechatpay_v2::sign_content(&fields, API_KEY.as_bytes());
        let mut g = c.benchmark_group(name);
        g.bench_function("adapter", |b| {
            b.iter(|| adapter.authenticate(black_box(&incoming)).unwrap())
        });
        if hmac {
            g.bench_function("raw_crypto", |b| {
                b.iter(|| crypto::hmac_sha256(API_KEY.as_bytes(), black_box(&content)))
            });
        } else {
            g.bench_function("raw_crypto", |b| {
                b.iter(|| crypto::md5(black_box(&content)))
            });
        }
        g.finish();
    }
}

fn wechat_v3(c: &mut Criterion) {
    let key = PlatformKey::generate().unwrap();
    let cert = key.certificate(&[0x3A, 0x11]).unwrap();
    let adapter = Adapter::WechatPayV3(
        WechatPayV3::new(
            Some("1900000001".into()),
            None,
            API_V3_KEY,
            &[cert.into_bytes()],
            None,
            300,
        )
        .unwrap(),
    );
    let resource = signer::wechat_v3_transaction("1900000001", "BENCH0003");
    let signed = signer::wechat_v3_request(
        &key,
        "3A11",
        API_V3_KEY,
        &resource,
        "TRANSACTION.SUCCESS",
        NOW,
    )
    .unwrap();
    let (pairs, body) = (signed.headers, signed.body);
    let mut headers = http::HeaderMap::new();
    for (k, v) in &pairs {
        headers.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let incoming = Incoming {
        headers: &headers,
        body: &body,
        now: NOW,
    };
    assert!(adapter.authenticate(&incoming).is_ok());
    // The raw cost: one RSA-2048 verify of the signed message plus one AES-256-GCM open.
    let header = |n: &str| pairs.iter().find(|(k, _)| k == n).unwrap().1.clone();
    let mut message = format!(
        "{}\n{}\n",
        header("wechatpay-timestamp"),
        header("wechatpay-nonce")
    )
    .into_bytes();
    message.extend_from_slice(&body);
    message.push(b'\n');
    let sig = crypto::base64_decode(header("wechatpay-signature").as_bytes()).unwrap();
    let verifier = RsaVerifier::new(&key.spki_der().unwrap(), RsaHash::Sha256).unwrap();
    let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let r = &envelope["resource"];
    let ciphertext = crypto::base64_decode(r["ciphertext"].as_str().unwrap().as_bytes()).unwrap();
    let nonce = r["nonce"].as_str().unwrap().as_bytes().to_vec();
    let mut g = c.benchmark_group("wechatpay_v3");
    g.bench_function("adapter", |b| {
        b.iter(|| adapter.authenticate(black_box(&incoming)).unwrap())
    });
    g.bench_function("raw_crypto", |b| {
        b.iter(|| {
            assert!(verifier.verify(black_box(&message), black_box(&sig)));
            crypto::aes256_gcm_open(API_V3_KEY, &nonce, b"transaction", black_box(&ciphertext))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, alipay, wechat_v2, wechat_v3);
criterion_main!(benches);
