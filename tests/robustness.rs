//! Arbitrary bytes into every parser and adapter: no panic, and memory bounded by a small
//! multiple of the input (measured with a counting allocator).

mod support;

use paynotify::provider::Incoming;
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts heap bytes per thread, so tests running in parallel do not disturb each other.
struct Counting;

thread_local! {
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = CURRENT.try_with(|c| {
            let now = c.get() + layout.size() as isize;
            c.set(now);
            let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
        });
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = CURRENT.try_with(|c| c.set(c.get() - layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Heap growth of this thread while `f` runs.
fn peak_during(f: impl FnOnce()) -> usize {
    let base = CURRENT.with(Cell::get);
    PEAK.with(|p| p.set(base));
    f();
    (PEAK.with(Cell::get) - base).max(0) as usize
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Adapters for one route of each platform, with keys from the committed fixtures.
fn adapters() -> Vec<paynotify::table::RoutingTable> {
    let dir = support::fixtures_dir();
    [
        serde_json::json!({"alipay": {"appId": "2021000000000001", "signType": "RSA2", "publicKey": {"file": "keys/alipay_public_key.txt"}}}),
        serde_json::json!({"wechatPayV2": {"appId": "wx0000000000000001", "mchId": "1900000001", "signType": "MD5", "apiKey": {"file": "keys/wechatpay_v2_api_key.txt"}}}),
        serde_json::json!({"wechatPayV3": {"mchId": "1900000001", "apiV3Key": {"file": "keys/wechatpay_v3_apiv3_key.txt"},
            "platformCertificates": [{"file": "keys/wechatpay_platform_cert_new.pem"}],
            "publicKey": {"id": "PUB_KEY_ID_0114232134912410000000000000000001", "key": {"file": "keys/wechatpay_pub_key.pem"}}}}),
    ]
    .iter()
    .map(|p| support::table_for(p, "/n", serde_json::json!([{"log": {}}]), &dir))
    .collect()
}

fn v3_headers(sig: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("wechatpay-timestamp", "1800000000".parse().unwrap());
    h.insert("wechatpay-nonce", "n".parse().unwrap());
    h.insert(
        "wechatpay-serial",
        "PUB_KEY_ID_0114232134912410000000000000000001"
            .parse()
            .unwrap(),
    );
    h.insert("wechatpay-signature", sig.parse().unwrap());
    h
}

/// Runs every adapter on `body` and returns the peak heap growth.
fn run_all(tables: &[paynotify::table::RoutingTable], body: &[u8]) -> usize {
    let headers = v3_headers("AAAA");
    peak_during(|| {
        for t in tables {
            let route = t.get("/n").unwrap();
            let incoming = Incoming {
                headers: &headers,
                body,
                now: 1_800_000_000,
            };
            let _ = route.adapter.authenticate(&incoming);
        }
    })
}

/// Structured garbage: fragments that reach deep into each parser.
fn fragments() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"<xml>".to_vec()),
        Just(b"</xml>".to_vec()),
        Just(b"<a><![CDATA[".to_vec()),
        Just(b"]]></a>".to_vec()),
        Just(b"&amp;&#x41;&lt;".to_vec()),
        Just(b"<!DOCTYPE x [<!ENTITY e \"e\">]>".to_vec()),
        Just(b"sign=".to_vec()),
        Just(b"&app_id=2021000000000001".to_vec()),
        Just(b"%E4%B8%AD%zz%".to_vec()),
        Just(b"{\"resource\":{\"ciphertext\":\"".to_vec()),
        Just(b"\",\"nonce\":\"123456789012\"}}".to_vec()),
        Just(b"[[[[{{{{".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..64),
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let tables = adapters();
        let peak = run_all(&tables, &body);
        prop_assert!(peak < 64 * 1024 + 16 * body.len(), "peak {peak} for {} bytes", body.len());
    }

    #[test]
    fn structured_garbage_never_panics(body in fragments()) {
        let tables = adapters();
        let peak = run_all(&tables, &body);
        prop_assert!(peak < 64 * 1024 + 16 * body.len(), "peak {peak} for {} bytes", body.len());
    }

    #[test]
    fn arbitrary_v3_headers_never_panic(sig in "\\PC{0,400}", ts in "\\PC{0,20}", serial in "\\PC{0,80}") {
        let tables = adapters();
        let mut h = http::HeaderMap::new();
        for (name, value) in [("wechatpay-signature", &sig), ("wechatpay-timestamp", &ts), ("wechatpay-serial", &serial), ("wechatpay-nonce", &ts)] {
            if let Ok(v) = http::HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        }
        let route = tables[2].get("/n").unwrap();
        let _ = route.adapter.authenticate(&Incoming { headers: &h, body: b"{}", now: 1_800_000_000 });
    }
}

/// Deep nesting and huge bodies at the size cap stay within bounds too.
#[test]
fn pathological_inputs_at_the_size_cap() {
    let tables = adapters();
    let cap = 256 * 1024;
    let inputs: Vec<Vec<u8>> = vec![
        b"[".repeat(cap),
        b"{\"a\":".repeat(cap / 5),
        b"<a>".repeat(cap / 3),
        b"<xml>"
            .iter()
            .chain(b"<a>x</a>".repeat(cap / 8).iter())
            .copied()
            .collect(),
        b"a=1&".repeat(cap / 4),
        b"%".repeat(cap),
        vec![0xff; cap],
    ];
    for body in inputs {
        let peak = run_all(&tables, &body);
        assert!(peak < 16 * cap, "peak {peak} for {} bytes", body.len());
    }
}
