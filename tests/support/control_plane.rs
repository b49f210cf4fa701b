//! A real Kubernetes control plane (etcd + kube-apiserver, no controller-manager, scheduler
//! or kubelet) for integration tests: what controller-runtime's envtest does, in Rust.
//!
//! Include it from an integration test with
//!
//! ```ignore
//! #[path = "support/control_plane.rs"]
//! mod control_plane;
//! ```
//!
//! and use [`shared()`]: one control plane per test binary, started on first use, shared by
//! all tests of that binary (give each test its own namespace with
//! [`ControlPlane::unique_namespace`]).
//!
//! Binaries: `PAYNOTIFY_KUBE_APISERVER` and `PAYNOTIFY_ETCD`, or, when either is unset,
//! whatever `bash scripts/kubebins.sh` prints (it builds them from the pinned wrapper modules
//! in tools/kubebins the first time: ~12 minutes on 2 cores, milliseconds warm). Anything that goes
//! wrong panics with the reason: a test that needs the control plane never skips.
//!
//! Teardown: the children are spawned from a dedicated thread that never exits, with
//! `PR_SET_PDEATHSIG=SIGKILL`, so the kernel kills them whenever the test process dies
//! (normal exit, panic, abort, SIGKILL). On a normal exit an `atexit` hook also kills them by
//! PID, reaps them and removes the temp dir; a dropped non-shared [`ControlPlane`] does the
//! same. Temp dirs left by processes that were killed are removed by the next start.
//! `PAYNOTIFY_CONTROL_PLANE_KEEP=1` keeps the temp dir (logs, PKI, kubeconfigs) until then.
//!
//! See docs/envtest.md.
#![allow(dead_code)]

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long etcd, then kube-apiserver, may take to become ready (each). Kubernetes' own
/// integration framework saw 31-35 s starts on loaded 2-core runners.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Lines of a component's log quoted in a start failure.
const LOG_TAIL_LINES: usize = 50;
/// Prefix of the per-control-plane temp dirs: `paynotify-cp-<pid>-<n>`.
const DIR_PREFIX: &str = "paynotify-cp-";
/// The admin's user name (its client certificate's CN); it is in `system:masters`.
pub const ADMIN_USER: &str = "paynotify-admin";

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
static STARTS: AtomicUsize = AtomicUsize::new(0);
static NAMESPACES: AtomicUsize = AtomicUsize::new(0);
static CERTS: AtomicUsize = AtomicUsize::new(0);

/// The control plane of this test binary, started on first use (from any test, sync or
/// async; it blocks the calling thread while it starts) and shared by every test after
/// that. Panics with the reason if it cannot start; later callers get the same panic
/// message instead of a second start attempt.
pub fn shared() -> &'static ControlPlane {
    match SHARED.get_or_init(ControlPlane::try_start) {
        Ok(plane) => plane,
        Err(msg) => panic!("the shared Kubernetes control plane did not start: {msg}"),
    }
}

/// How many control planes this process started (the shared one and any private ones).
pub fn starts() -> usize {
    STARTS.load(Ordering::SeqCst)
}

/// The admin kubeconfig of the shared control plane.
pub fn kubeconfig_path() -> &'static Path {
    shared().kubeconfig_path()
}

/// `https://127.0.0.1:<port>` of the shared control plane.
pub fn api_url() -> &'static str {
    shared().api_url()
}

/// The PEM of the CA that signed the shared control plane's serving and client certs.
pub fn ca_pem() -> &'static str {
    shared().ca_pem()
}

/// A client of the shared control plane acting as the admin (`system:masters`).
pub async fn client() -> kube::Client {
    shared().client().await
}

/// A fresh namespace on the shared control plane; see [`ControlPlane::unique_namespace`].
pub async fn unique_namespace(prefix: &str) -> String {
    shared().unique_namespace(prefix).await
}

/// A kube client from a kubeconfig file (its current context).
pub async fn client_from_kubeconfig(path: &Path) -> kube::Client {
    let kubeconfig = Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("reading kubeconfig {}: {e}", path.display()));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", path.display()));
    // rustls panics when it has more than one crypto provider compiled in and none was
    // installed; say what to do about it.
    match std::panic::catch_unwind(|| kube::Client::try_from(config)) {
        Ok(client) => client.unwrap_or_else(|e| panic!("kube client: {e}")),
        Err(e) => panic!(
            "creating a kube client panicked: {}\nIf this is rustls' \"Could not automatically \
             determine the process-level CryptoProvider\": both its ring and aws-lc-rs \
             providers are compiled in. Build kube with `default-features = false` and the \
             `aws-lc-rs` feature (see docs/envtest.md).",
            panic_message(&*e)
        ),
    }
}

/// A running etcd + kube-apiserver pair on loopback, with its PKI and an admin kubeconfig in
/// a private temp dir.
pub struct ControlPlane {
    dir: PathBuf,
    api_url: String,
    kubeconfig: PathBuf,
    ca_pem: String,
    ca: Issuer<'static, KeyPair>,
    apiserver_pid: u32,
    etcd_pid: u32,
    /// Dropping it tells the keeper thread to stop the children and remove `dir`.
    stop: Mutex<Option<mpsc::Sender<mpsc::Sender<()>>>>,
}

impl ControlPlane {
    /// Starts a private control plane (most tests want [`shared()`] instead). It is stopped
    /// when dropped, or when the process exits.
    pub fn start() -> ControlPlane {
        Self::try_start().unwrap_or_else(|msg| panic!("{msg}"))
    }

    /// [`ControlPlane::start`], with the reason it could not start as the error.
    pub fn try_start() -> Result<ControlPlane, String> {
        STARTS.fetch_add(1, Ordering::SeqCst);
        let bins = binaries()?;
        remove_stale_dirs();
        let (ready_tx, ready_rx) = mpsc::channel();
        // The thread that spawns the children must outlive them: PR_SET_PDEATHSIG fires when
        // the spawning *thread* exits. It only ends after a stop request (a dropped private
        // control plane); the shared one's keeper lives as long as the process.
        std::thread::Builder::new()
            .name("control-plane-keeper".into())
            .spawn(move || keeper(bins, ready_tx))
            .map_err(|e| format!("spawning the control-plane keeper thread: {e}"))?;
        ready_rx
            .recv()
            .unwrap_or_else(|_| Err("the control-plane keeper thread died while starting".into()))
    }

    /// The admin kubeconfig (user `paynotify-admin` in `system:masters`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// The PEM of the CA that signed the serving certificate and every client certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The temp dir: PKI, kubeconfigs, `etcd.log`, `kube-apiserver.log`, etcd's data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The PIDs of kube-apiserver and etcd.
    pub fn pids(&self) -> (u32, u32) {
        (self.apiserver_pid, self.etcd_pid)
    }

    /// A client acting as the admin. Call it from the runtime that will use the client (a
    /// client is tied to the tokio runtime it was made in, and each `#[tokio::test]` has its
    /// own).
    pub async fn client(&self) -> kube::Client {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Mints a client certificate for `user` (the cert's CN) in `groups` (its O attributes;
    /// at most two, see below) signed by the cluster's CA, and writes a kubeconfig for it.
    /// Returns the kubeconfig's path. The user has no RBAC permissions until a test binds
    /// some; the apiserver adds the group `system:authenticated` itself.
    ///
    /// At most two groups: rcgen keeps one value per attribute type, so the second group is
    /// written under the same OID (2.5.4.10) through a custom attribute type.
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str]) -> PathBuf {
        assert!(
            groups.len() <= 2,
            "user_kubeconfig: at most two groups per client certificate (got {groups:?}); \
             for more, bind RBAC to the user or use impersonation"
        );
        let n = CERTS.fetch_add(1, Ordering::SeqCst);
        let key = KeyPair::generate().expect("generating a client key");
        let cert = client_cert(user, groups, &key, &self.ca);
        let path = self.dir.join(format!("user-{n}.kubeconfig"));
        write_private(
            &path,
            &kubeconfig_yaml(
                &self.api_url,
                &self.ca_pem,
                user,
                &cert,
                &key.serialize_pem(),
            ),
        );
        path
    }

    /// A client for `user` in `groups`; see [`ControlPlane::user_kubeconfig`].
    pub async fn user_client(&self, user: &str, groups: &[&str]) -> kube::Client {
        client_from_kubeconfig(&self.user_kubeconfig(user, groups)).await
    }

    /// Creates a fresh namespace `<prefix>-<n>-<random>` and returns its name. Namespaces
    /// are never deleted (without a controller-manager they would stay Terminating anyway);
    /// they go with the control plane.
    pub async fn unique_namespace(&self, prefix: &str) -> String {
        let n = NAMESPACES.fetch_add(1, Ordering::SeqCst);
        let mut prefix: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        prefix = prefix.trim_matches('-').to_string();
        if prefix.is_empty() {
            prefix = "test".into();
        }
        let name = format!("{prefix}-{n}-{:06x}", random_u64() & 0xff_ffff);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client().await)
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        name
    }

    fn stop(&self) {
        let Some(stop) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let (done_tx, done_rx) = mpsc::channel();
        if stop.send(done_tx).is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(30));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

// --- binaries ------------------------------------------------------------------------------

struct Binaries {
    apiserver: PathBuf,
    etcd: PathBuf,
}

/// The two binaries from the environment, else from `bash scripts/kubebins.sh`.
fn binaries() -> Result<Binaries, String> {
    let from_env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let (mut apiserver, mut etcd) = (
        from_env("PAYNOTIFY_KUBE_APISERVER"),
        from_env("PAYNOTIFY_ETCD"),
    );
    if apiserver.is_none() || etcd.is_none() {
        let unset: Vec<&str> = [
            ("PAYNOTIFY_KUBE_APISERVER", apiserver.is_none()),
            ("PAYNOTIFY_ETCD", etcd.is_none()),
        ]
        .iter()
        .filter(|(_, unset)| *unset)
        .map(|(name, _)| *name)
        .collect();
        eprintln!(
            "control plane: {} not set, running scripts/kubebins.sh (it builds the binaries \
             the first time: ~12 minutes on 2 cores)",
            unset.join(" and ")
        );
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new("bash")
            .arg("scripts/kubebins.sh")
            .current_dir(root)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run `bash scripts/kubebins.sh`: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`bash scripts/kubebins.sh` failed ({}): kube-apiserver and etcd are needed \
                 for this test (see docs/envtest.md); its messages are above",
                out.status
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        for line in stdout.lines() {
            if let Some(v) = line.strip_prefix("PAYNOTIFY_KUBE_APISERVER=") {
                apiserver = apiserver.or_else(|| Some(PathBuf::from(v)));
            } else if let Some(v) = line.strip_prefix("PAYNOTIFY_ETCD=") {
                etcd = etcd.or_else(|| Some(PathBuf::from(v)));
            }
        }
    }
    let check = |what: &str, path: Option<PathBuf>| {
        let path = path.ok_or_else(|| {
            format!("scripts/kubebins.sh printed no {what}=<path> line on stdout")
        })?;
        let executable = fs::metadata(&path)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        if executable {
            Ok(path)
        } else {
            Err(format!(
                "{what}: {} is not an executable file",
                path.display()
            ))
        }
    };
    Ok(Binaries {
        apiserver: check("PAYNOTIFY_KUBE_APISERVER", apiserver)?,
        etcd: check("PAYNOTIFY_ETCD", etcd)?,
    })
}

// --- the keeper thread ---------------------------------------------------------------------

/// What the atexit hook must clean up, per live control plane.
struct Registered {
    dir: PathBuf,
    pids: Vec<u32>,
}

static REGISTRY: Mutex<Vec<Registered>> = Mutex::new(Vec::new());
static ATEXIT: OnceLock<()> = OnceLock::new();

extern "C" fn cleanup_at_exit() {
    // try_lock: never block process exit on a thread that died holding the lock.
    let Ok(mut planes) = REGISTRY.try_lock() else {
        return;
    };
    for plane in planes.drain(..) {
        kill_and_reap(&plane.pids);
        remove_dir(&plane.dir);
    }
}

/// Kills (apiserver first, then etcd) and reaps.
fn kill_and_reap(pids: &[u32]) {
    for &pid in pids.iter().rev() {
        // SAFETY: plain syscalls on PIDs of children this process spawned and has not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
            libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
        }
    }
}

type Ready = Result<ControlPlane, String>;

fn keeper(bins: Binaries, ready: mpsc::Sender<Ready>) {
    let dir = match make_dir() {
        Ok(dir) => dir,
        Err(e) => {
            let _ = ready.send(Err(format!("creating the control plane's temp dir: {e}")));
            return;
        }
    };
    // A panic in here (a bug) must still reach the caller, and must not leave children.
    let mut children: Vec<Child> = Vec::new();
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        start_in(&bins, &dir, &mut children)
    }))
    .unwrap_or_else(|e| Err(panic_message(&*e)));
    let (plane, stop_rx) = match started {
        Ok(ok) => ok,
        Err(msg) => {
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            remove_dir(&dir);
            let _ = ready.send(Err(msg));
            return;
        }
    };
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Registered {
            dir: dir.clone(),
            pids: pids.clone(),
        });
    ATEXIT.get_or_init(|| {
        // SAFETY: registers a plain extern "C" function with no arguments.
        unsafe {
            libc::atexit(cleanup_at_exit);
        }
    });
    let stop_request = match ready.send(Ok(plane)) {
        // Park until a stop request. For the shared control plane it never comes: this
        // thread lives until the process exits, and so PDEATHSIG only fires then.
        Ok(()) => stop_rx.recv().map(Some),
        // Nobody is waiting for it (cannot happen: try_start blocks on the answer): disarm
        // its Drop, which would wait for this very thread, and clean up now.
        Err(mpsc::SendError(unsent)) => {
            if let Ok(plane) = unsent {
                plane.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
            Ok(None)
        }
    };
    if let Ok(done) = stop_request {
        REGISTRY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|r| r.dir != dir);
        // Apiserver first, then etcd.
        for child in children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_dir(&dir);
        if let Some(done) = done {
            let _ = done.send(());
        }
    } else {
        // The ControlPlane was leaked without a stop request: keep the children's parent
        // thread alive for the rest of the process.
        loop {
            std::thread::park();
        }
    }
}

type Started = (ControlPlane, mpsc::Receiver<mpsc::Sender<()>>);

fn start_in(bins: &Binaries, dir: &Path, children: &mut Vec<Child>) -> Result<Started, String> {
    let t0 = Instant::now();
    let pki = Pki::generate(dir)?;

    // Free ports are found by binding :0 and letting go; another process may grab one in
    // between, so a start that fails on a taken port is retried with fresh ports.
    let mut attempt = 0;
    let api_port = loop {
        attempt += 1;
        let [client_port, peer_port, api_port] = free_ports::<3>()?;
        let etcd = spawn_etcd(&bins.etcd, dir, client_port, peer_port)?;
        children.push(etcd);
        match wait_etcd(children.last_mut().unwrap(), dir, client_port) {
            Ok(()) => {}
            Err(e) if attempt < 3 && e.contains("address already in use") => {
                kill_last(children);
                let _ = fs::remove_dir_all(dir.join("etcd-data"));
                continue;
            }
            Err(e) => return Err(e),
        }
        let etcd_ready = t0.elapsed();
        pki.write_admin_kubeconfig(&format!("https://127.0.0.1:{api_port}"));
        let apiserver = spawn_apiserver(&bins.apiserver, dir, &pki, client_port, api_port)?;
        children.push(apiserver);
        match wait_apiserver(children.last_mut().unwrap(), dir, &pki) {
            Ok(()) => {
                eprintln!(
                    "control plane: etcd ready after {:.1} s, kube-apiserver on \
                     https://127.0.0.1:{api_port} ready after {:.1} s (temp dir {})",
                    etcd_ready.as_secs_f64(),
                    t0.elapsed().as_secs_f64(),
                    dir.display()
                );
                break api_port;
            }
            Err(e) if attempt < 3 && e.contains("address already in use") => {
                kill_last(children);
                kill_last(children);
                let _ = fs::remove_dir_all(dir.join("etcd-data"));
                continue;
            }
            Err(e) => return Err(e),
        }
    };
    let (stop_tx, stop_rx) = mpsc::channel();
    let plane = ControlPlane {
        dir: dir.to_path_buf(),
        api_url: format!("https://127.0.0.1:{api_port}"),
        kubeconfig: pki.admin_kubeconfig.clone(),
        ca_pem: pki.ca_pem.clone(),
        ca: pki.ca,
        apiserver_pid: children[1].id(),
        etcd_pid: children[0].id(),
        stop: Mutex::new(Some(stop_tx)),
    };
    Ok((plane, stop_rx))
}

fn kill_last(children: &mut Vec<Child>) {
    if let Some(mut child) = children.pop() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A command whose process gets SIGKILL when the spawning thread (the keeper) dies.
fn command(program: &Path, log: &Path) -> Result<Command, String> {
    let log = File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("duplicating a log file handle: {e}"))?;
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

fn spawn_etcd(bin: &Path, dir: &Path, client_port: u16, peer_port: u16) -> Result<Child, String> {
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut cmd = command(bin, &dir.join("etcd.log"))?;
    cmd.arg("--name=paynotify")
        .arg(format!("--data-dir={}", dir.join("etcd-data").display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=paynotify={peer}"))
        .arg("--unsafe-no-fsync=true")
        .arg("--log-level=warn");
    cmd.spawn()
        .map_err(|e| format!("starting etcd {}: {e}", bin.display()))
}

fn spawn_apiserver(
    bin: &Path,
    dir: &Path,
    pki: &Pki,
    etcd_port: u16,
    api_port: u16,
) -> Result<Child, String> {
    let p = |name: &str| dir.join(name).display().to_string();
    let mut cmd = command(bin, &dir.join("kube-apiserver.log"))?;
    cmd.arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={api_port}"))
        // Without it the apiserver needs a default route to pick an address.
        .arg("--advertise-address=127.0.0.1")
        .arg(format!("--cert-dir={}", p("pki")))
        .arg(format!("--tls-cert-file={}", pki.serving_cert.display()))
        .arg(format!(
            "--tls-private-key-file={}",
            pki.serving_key.display()
        ))
        .arg(format!("--client-ca-file={}", pki.ca_cert.display()))
        .arg(format!(
            "--service-account-issuer=https://127.0.0.1:{api_port}/"
        ))
        .arg(format!(
            "--service-account-key-file={}",
            pki.sa_pub.display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            pki.sa_key.display()
        ))
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        .arg("--authorization-mode=RBAC")
        .arg("--allow-privileged=true")
        // No controller-manager creates the default ServiceAccount.
        .arg("--disable-admission-plugins=ServiceAccount")
        // With a loopback advertise address the endpoint reconciler only logs errors.
        .arg("--endpoint-reconciler-type=none");
    cmd.spawn()
        .map_err(|e| format!("starting kube-apiserver {}: {e}", bin.display()))
}

fn wait_etcd(child: &mut Child, dir: &Path, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let log = dir.join("etcd.log");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(failure("etcd", &format!("exited ({status})"), &log));
        }
        if let Some(body) = http_get_loopback(port, "/health")
            && body.contains("\"health\":\"true\"")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(failure(
                "etcd",
                &format!("/health not ok after {} s", START_TIMEOUT.as_secs()),
                &log,
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_apiserver(child: &mut Child, dir: &Path, pki: &Pki) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let log = dir.join("kube-apiserver.log");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async {
        let client = client_from_kubeconfig(&pki.admin_kubeconfig).await;
        let namespaces = Api::<Namespace>::all(client.clone());
        let mut last = String::from("no answer yet");
        let mut ready = false;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(failure(
                    "kube-apiserver",
                    &format!("exited ({status})"),
                    &log,
                ));
            }
            if !ready {
                // /readyz, not /healthz: it also waits for the post-start hooks (RBAC
                // bootstrap roles among them).
                let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
                match tokio::time::timeout(Duration::from_secs(5), client.request_text(req)).await {
                    Ok(Ok(body)) if body.trim() == "ok" => ready = true,
                    Ok(Ok(body)) => last = format!("/readyz: {body}"),
                    Ok(Err(e)) => last = format!("/readyz: {e}"),
                    Err(_) => last = "/readyz: timed out".into(),
                }
            }
            if ready {
                match tokio::time::timeout(Duration::from_secs(5), namespaces.get_opt("default"))
                    .await
                {
                    Ok(Ok(Some(_))) => return Ok(()),
                    Ok(Ok(None)) => last = "namespace default does not exist yet".into(),
                    Ok(Err(e)) => last = format!("namespace default: {e}"),
                    Err(_) => last = "namespace default: timed out".into(),
                }
            }
            if Instant::now() > deadline {
                return Err(failure(
                    "kube-apiserver",
                    &format!(
                        "not ready after {} s (last: {last})",
                        START_TIMEOUT.as_secs()
                    ),
                    &log,
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn failure(component: &str, what: &str, log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_else(|e| format!("(cannot read log: {e})"));
    let lines: Vec<&str> = text.lines().collect();
    let tail = if lines.is_empty() {
        "(the log is empty)".to_string()
    } else {
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    };
    format!(
        "{component} {what}. Last {LOG_TAIL_LINES} lines of {}:\n{tail}",
        log.display()
    )
}

/// GET on 127.0.0.1 over plain HTTP/1.0; the body, or None on any error.
fn http_get_loopback(port: u16, path: &str) -> Option<String> {
    let addr = (Ipv4Addr::LOCALHOST, port).into();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.")
        .then_some(())
        .filter(|_| head.split_whitespace().nth(1) == Some("200"))?;
    Some(body.to_string())
}

fn free_ports<const N: usize>() -> Result<[u16; N], String> {
    // Hold all listeners at once so the N ports differ.
    let listeners = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("finding a free loopback port: {e}"))?;
    let mut ports = [0; N];
    for (port, l) in ports.iter_mut().zip(&listeners) {
        *port = l
            .local_addr()
            .map_err(|e| format!("finding a free loopback port: {e}"))?
            .port();
    }
    Ok(ports)
}

// --- temp dirs -----------------------------------------------------------------------------

/// Removes a control plane's temp dir, unless `PAYNOTIFY_CONTROL_PLANE_KEEP` is set (to read
/// the logs of a run afterwards).
fn remove_dir(dir: &Path) {
    if std::env::var_os("PAYNOTIFY_CONTROL_PLANE_KEEP").is_some_and(|v| !v.is_empty()) {
        eprintln!("control plane: kept {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(dir);
    }
}

fn make_dir() -> std::io::Result<PathBuf> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "{DIR_PREFIX}{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new().mode(0o700).create(&dir)?;
    fs::DirBuilder::new().mode(0o700).create(dir.join("pki"))?;
    Ok(dir)
}

/// Removes `paynotify-cp-<pid>-*` dirs whose process is gone (killed before its atexit ran).
fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn write_private(path: &Path, contents: &str) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

// --- PKI -----------------------------------------------------------------------------------

struct Pki {
    ca: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_cert: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_pub: PathBuf,
    sa_key: PathBuf,
    admin_cert_pem: String,
    admin_key_pem: String,
    admin_kubeconfig: PathBuf,
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(7);
}

impl Pki {
    /// ECDSA P-256 throughout: a CA, the serving cert (localhost, 127.0.0.1), an admin
    /// client cert (O=system:masters) and the service-account signing key pair.
    fn generate(dir: &Path) -> Result<Pki, String> {
        let e = |what: &'static str| move |err: rcgen::Error| format!("{what}: {err}");
        let pki = dir.join("pki");
        let write = |name: &str, contents: &str| {
            let path = pki.join(name);
            write_private(&path, contents);
            path
        };

        let ca_key = KeyPair::generate().map_err(e("CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "paynotify-tests");
        params
            .distinguished_name
            .push(DnType::CommonName, "paynotify-test-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        let ca_pem = params.self_signed(&ca_key).map_err(e("CA cert"))?.pem();
        let ca = Issuer::new(params, ca_key);
        let ca_cert = write("ca.crt", &ca_pem);

        let serving = KeyPair::generate().map_err(e("serving key"))?;
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .map_err(e("serving cert params"))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params);
        let serving_pem = params
            .signed_by(&serving, &ca)
            .map_err(e("serving cert"))?
            .pem();
        let serving_cert = write("apiserver.crt", &serving_pem);
        let serving_key = write("apiserver.key", &serving.serialize_pem());

        let sa = KeyPair::generate().map_err(e("service-account key"))?;
        let sa_pub = write("sa.pub", &sa.public_key_pem());
        let sa_key = write("sa.key", &sa.serialize_pem());

        let admin = KeyPair::generate().map_err(e("admin key"))?;
        let admin_cert_pem = client_cert(ADMIN_USER, &["system:masters"], &admin, &ca);
        Ok(Pki {
            ca,
            ca_pem,
            ca_cert,
            serving_cert,
            serving_key,
            sa_pub,
            sa_key,
            admin_cert_pem,
            admin_key_pem: admin.serialize_pem(),
            admin_kubeconfig: dir.join("admin.kubeconfig"),
        })
    }

    /// (Re)writes the admin kubeconfig for the apiserver at `server`.
    fn write_admin_kubeconfig(&self, server: &str) {
        write_private(
            &self.admin_kubeconfig,
            &kubeconfig_yaml(
                server,
                &self.ca_pem,
                ADMIN_USER,
                &self.admin_cert_pem,
                &self.admin_key_pem,
            ),
        );
    }
}

/// A client certificate (PEM) for `user` in `groups`, signed by `ca`.
fn client_cert(user: &str, groups: &[&str], key: &KeyPair, ca: &Issuer<'_, KeyPair>) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    // kube-apiserver's x509 authenticator: user = CN, groups = every O attribute.
    if let Some(first) = groups.first() {
        params
            .distinguished_name
            .push(DnType::OrganizationName, *first);
    }
    if let Some(second) = groups.get(1) {
        params
            .distinguished_name
            .push(DnType::CustomDnType(vec![2, 5, 4, 10]), *second);
    }
    params.distinguished_name.push(DnType::CommonName, user);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params);
    params
        .signed_by(key, ca)
        .unwrap_or_else(|e| panic!("signing a client certificate for {user}: {e}"))
        .pem()
}

fn kubeconfig_yaml(
    server: &str,
    ca_pem: &str,
    user: &str,
    cert_pem: &str,
    key_pem: &str,
) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: paynotify-test\n  cluster:\n    \
         server: {server}\n    certificate-authority-data: {}\nusers:\n- name: {user:?}\n  \
         user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: \
         paynotify-test\n  context:\n    cluster: paynotify-test\n    user: {user:?}\n\
         current-context: paynotify-test\n",
        b64(ca_pem),
        b64(cert_pem),
        b64(key_pem),
    )
}

// --- misc ----------------------------------------------------------------------------------

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = e.downcast_ref::<&str>() {
        (*s).to_string()
    } else {
        "panic with a non-string payload".into()
    }
}
