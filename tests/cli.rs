//! The `paynotify` binary as a user runs it: `verify` exit codes and reports, and `serve`
//! with SIGHUP reloads and a graceful SIGTERM.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_paynotify");

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn verify(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("verify")
        .args(args)
        .current_dir(examples())
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn verify_explains_the_verdict() {
    let (code, out) = verify(&[
        "--provider",
        "alipay",
        "--key",
        "keys/alipay_public.txt",
        "--app-id",
        "2021000000000001",
        "notifications/alipay.txt",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("verdict: VERIFIED"));
    assert!(out.contains("signed string"));
    assert!(out.contains("algorithm: SHA256withRSA"));
    assert!(out.contains("key fingerprint: SHA256:"));

    let tampered =
        std::env::temp_dir().join(format!("paynotify-tampered-{}.txt", std::process::id()));
    let body = std::fs::read_to_string(examples().join("notifications/alipay.txt")).unwrap();
    std::fs::write(
        &tampered,
        body.replace("total_amount=88.88", "total_amount=0.01"),
    )
    .unwrap();
    let (code, out) = verify(&[
        "--provider",
        "alipay",
        "--key",
        "keys/alipay_public.txt",
        tampered.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        out.contains("REJECTED (bad_signature)") && out.contains("body changed"),
        "{out}"
    );
    std::fs::remove_file(&tampered).unwrap();

    let (code, out) = verify(&[
        "--provider",
        "alipay",
        "--key",
        "keys/wechatpay_v3_public.pem",
        "notifications/alipay.txt",
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("wrong key"), "{out}");

    let (code, out) = verify(&[
        "--provider",
        "wechatpay-v2",
        "--key",
        "keys/wechatpay_v2_api_key.txt",
        "notifications/wechatpay_v2.xml",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains(
            std::fs::read_to_string(examples().join("keys/wechatpay_v2_api_key.txt"))
                .unwrap()
                .trim()
        ),
        "the API key must not be printed"
    );

    let (code, out) = verify(&[
        "--provider",
        "alipay",
        "--key",
        "keys/webhook_secret.txt",
        "notifications/alipay.txt",
    ]);
    assert_eq!(code, 2);
    assert!(
        out.contains("not PEM and not base64") || out.contains("not an RSA"),
        "{out}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    port: u16,
    admin: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn write_config(dir: &Path, port: u16, admin: u16, alipay_key: &str) {
    let examples = examples();
    let text = format!(
        "listen: 127.0.0.1:{port}\nadminListen: 127.0.0.1:{admin}\nroutes:\n  - name: demo-alipay\n    path: /notify/demo/alipay\n    provider:\n      alipay: {{appId: \"2021000000000001\", signType: RSA2, publicKey: {{file: {}}}}}\n    targets: [{{log: {{}}}}]\n    signing: {{secret: {{file: {}}}}}\n",
        examples.join(alipay_key).display(),
        examples.join("keys/webhook_secret.txt").display()
    );
    let mut f = std::fs::File::create(dir.join("config.yaml")).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let resp = reqwest::blocking::get(format!("http://127.0.0.1:{port}{path}")).ok()?;
    Some((resp.status().as_u16(), resp.text().unwrap_or_default()))
}

fn post_sample(port: u16) -> (u16, String) {
    let body = std::fs::read(examples().join("notifications/alipay.txt")).unwrap();
    let resp = reqwest::blocking::Client::new()
        .post(format!("http://127.0.0.1:{port}/notify/demo/alipay"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .unwrap();
    (resp.status().as_u16(), resp.text().unwrap())
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
}

fn metric(admin: u16, name: &str) -> String {
    let (_, text) = get(admin, "/metrics").unwrap();
    text.lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn serve_reloads_on_sighup_and_drains_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("paynotify-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (port, admin) = (free_port(), free_port());
    write_config(&dir, port, admin, "keys/alipay_public.txt");
    let child = Command::new(BIN)
        .args([
            "serve",
            "--config",
            dir.join("config.yaml").to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server { child, port, admin };
    wait_until("readiness", || {
        get(server.admin, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    assert_eq!(get(server.admin, "/healthz").unwrap().0, 200);
    assert_eq!(post_sample(server.port), (200, "success".into()));

    // A broken file is refused, counted, and the old table keeps serving.
    std::fs::write(dir.join("config.yaml"), "listen: [not an address\n").unwrap();
    signal(&server.child, "-HUP");
    wait_until("reload error", || {
        metric(server.admin, "paynotify_config_reload_errors_total")
            == "paynotify_config_reload_errors_total 1"
    });
    assert_eq!(post_sample(server.port), (200, "success".into()));
    assert_eq!(
        metric(server.admin, "paynotify_table_generation"),
        "paynotify_table_generation 1"
    );

    // A good file with another key takes effect: the sample no longer verifies.
    write_config(&dir, port, admin, "keys/wechatpay_v3_public.pem");
    signal(&server.child, "-HUP");
    wait_until("reload", || {
        metric(server.admin, "paynotify_table_generation") == "paynotify_table_generation 3"
    });
    assert_eq!(post_sample(server.port), (400, "fail".into()));

    // SIGTERM: readiness goes away and the process exits cleanly.
    let mut server = server;
    signal(&server.child, "-TERM");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "serve did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn serve_refuses_a_bad_config_at_start() {
    let dir = std::env::temp_dir().join(format!("paynotify-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.yaml"),
        "listen: 127.0.0.1:1\nroutes:\n  - name: r\n    path: nope\n    provider: {alipay: {appId: \"1\", signType: RSA2, publicKey: {value: garbage}}}\n    targets: []\n    signing: {secret: {value: short}}\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--config",
            dir.join("config.yaml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "route \"r\": path:",
        "route \"r\": provider.alipay.publicKey:",
        "route \"r\": targets:",
        "route \"r\": signing.secret:",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn verify_shows_alipay_certificate_sns() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let case: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("cases/alipay/alipay_rsa2_cert_mode.json")).unwrap(),
    )
    .unwrap();
    let body = std::env::temp_dir().join(format!("paynotify-cert-{}.txt", std::process::id()));
    std::fs::write(&body, case["request"]["body"].as_str().unwrap()).unwrap();
    let cert = fixtures.join("keys/alipayCertPublicKey_RSA2.crt");
    let root = fixtures.join("keys/alipayRootCert.crt");
    let (code, out) = verify(&[
        "--provider",
        "alipay",
        "--key",
        cert.to_str().unwrap(),
        "--root-cert",
        root.to_str().unwrap(),
        body.to_str().unwrap(),
    ]);
    std::fs::remove_file(&body).unwrap();
    assert_eq!(code, 0, "{out}");
    let leaf = paynotify::keys::parse_certificate_pem(&std::fs::read(&cert).unwrap()).unwrap();
    let root_sn = paynotify::keys::alipay_root_cert_sn(&std::fs::read(&root).unwrap()).unwrap();
    assert_eq!(leaf.alipay_sn.len(), 32);
    assert!(
        out.contains(&format!("alipay_cert_sn: {}", leaf.alipay_sn)),
        "{out}"
    );
    assert!(
        out.contains(&format!("alipay_root_cert_sn: {root_sn}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("certificate issuer: {}", leaf.issuer)),
        "{out}"
    );
}
