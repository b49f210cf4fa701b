//! The `paynotify` binary: parses the subcommand and calls the library.

use clap::{Parser, Subcommand, ValueEnum};
use paynotify::inspect::{self, VerifyRequest};
use paynotify::provider::ProviderKind;
use paynotify::spec::GoDuration;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

// Every notification allocates and frees many small buffers on two HTTP exchanges; the
// profile of `bench/run.sh` showed glibc malloc at a fifth of the ingress's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "paynotify",
    version,
    about = "Verifying ingress for Alipay and WeChat Pay payment notifications"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the standalone ingress from a config file (SIGHUP reloads it).
    Serve {
        /// The YAML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check one captured notification offline and explain the verdict.
    Verify(Box<VerifyArgs>),
    /// Print the PaymentNotifyRoute CustomResourceDefinition as YAML.
    Crd,
    /// Run the Kubernetes controller (leader-elected).
    Controller(ControllerArgs),
    /// Run the cluster ingress, serving the controller's routing table.
    Ingress(IngressArgs),
    /// Show queued events with their deliveries and every attempt (JSON lines).
    Events(EventsArgs),
    /// Re-queue dead letters (or, with --include-delivered, delivered events).
    Replay(ReplayArgs),
}

#[derive(clap::Args)]
struct StoreSelection {
    /// The config file whose store to open.
    #[arg(long, conflicts_with = "store")]
    config: Option<PathBuf>,
    /// The store file itself.
    #[arg(long, conflicts_with = "nats_url")]
    store: Option<PathBuf>,
    /// Event id (repeatable).
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Every event of this route (`namespace/name` in a cluster)…
    #[arg(long)]
    route: Option<String>,
    /// …received at or after this RFC 3339 time…
    #[arg(long)]
    since: Option<String>,
    /// …and before this one.
    #[arg(long)]
    until: Option<String>,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(clap::Args)]
struct EventsArgs {
    #[command(flatten)]
    selection: StoreSelection,
    /// Most events shown, newest first.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

#[derive(clap::Args)]
struct ReplayArgs {
    #[command(flatten)]
    selection: StoreSelection,
    /// Also re-send deliveries that already succeeded.
    #[arg(long)]
    include_delivered: bool,
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// The operator's namespace (Lease and routing table Secret).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// Serve routes from these namespaces only (comma-separated); all namespaces if empty.
    #[arg(long, env = "PAYNOTIFY_WATCH_NAMESPACES", value_delimiter = ',')]
    watch_namespaces: Vec<String>,
    /// Name of the routing table Secret.
    #[arg(long, default_value = "paynotify-routing-table")]
    table_secret: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "paynotify-controller")]
    lease_name: String,
    /// This replica's identity (the Pod name).
    #[arg(long, env = "POD_NAME")]
    identity: String,
    /// Lease duration in seconds.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// The cluster DNS domain, for Service targets.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// The ingress's public base URL, e.g. https://pay.example.com (shown in route status).
    #[arg(long, env = "PAYNOTIFY_PUBLIC_BASE_URL")]
    public_base_url: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9090")]
    admin_listen: std::net::SocketAddr,
}

#[derive(clap::Args)]
struct IngressArgs {
    /// Namespace of the routing table Secret.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// Name of the routing table Secret.
    #[arg(long, default_value = "paynotify-routing-table")]
    table_secret: String,
    /// Where the platforms post notifications.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: std::net::SocketAddr,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9090")]
    admin_listen: std::net::SocketAddr,
    /// Largest accepted body in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    max_body_bytes: usize,
    /// Longest a request may take, e.g. 10s.
    #[arg(long, default_value = "10s")]
    request_timeout: String,
    /// Most delivered notifications remembered for deduplication.
    #[arg(long, default_value_t = 500_000)]
    dedup_max_entries: usize,
    /// The embedded store for Queued routes (one replica, on a persistent volume).
    #[arg(long)]
    store: Option<PathBuf>,
    /// The store refuses new events beyond this size.
    #[arg(long, default_value_t = 1 << 30)]
    store_max_bytes: u64,
    /// Serve POST /replay on the admin listener.
    #[arg(long)]
    admin_replay: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

/// Where the NATS JetStream store is.
#[derive(clap::Args)]
struct NatsArgs {
    /// NATS server URL(s), comma-separated: the JetStream store for Queued routes, shared by
    /// every ingress replica.
    #[arg(long, env = "PAYNOTIFY_NATS_URL")]
    nats_url: Option<String>,
    /// NATS credentials file (JWT and NKey seed).
    #[arg(long, env = "PAYNOTIFY_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// The JetStream stream name.
    #[arg(long, default_value = "PAYNOTIFY")]
    nats_stream: String,
    /// Stream replicas.
    #[arg(long, default_value_t = 3)]
    nats_replicas: usize,
}

impl NatsArgs {
    fn settings(&self) -> Option<Result<paynotify::delivery::jetstream::NatsSettings, String>> {
        let url = self.nats_url.as_ref()?;
        let mut s = paynotify::delivery::jetstream::NatsSettings::new(url.clone());
        s.credentials_file = self.nats_creds.clone();
        s.stream = self.nats_stream.clone();
        s.replicas = self.nats_replicas;
        let problems = s.problems();
        Some(if problems.is_empty() {
            Ok(s)
        } else {
            Err(problems.join("; "))
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Provider {
    Alipay,
    #[value(name = "wechatpay-v2")]
    WechatpayV2,
    #[value(name = "wechatpay-v3")]
    WechatpayV3,
}

#[derive(clap::Args)]
struct VerifyArgs {
    /// The platform that sent the notification.
    #[arg(long, value_enum)]
    provider: Provider,
    /// Key file: the Alipay public key or certificate, the WeChat Pay v2 API key, or a
    /// WeChat Pay platform certificate (repeatable) or public key.
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    /// Alipay: RSA2 (default) or RSA. WeChat Pay v2: MD5 (default) or HMAC-SHA256.
    #[arg(long)]
    sign_type: Option<String>,
    /// Also check the app id.
    #[arg(long)]
    app_id: Option<String>,
    /// Also check the merchant id (WeChat Pay).
    #[arg(long)]
    mch_id: Option<String>,
    /// WeChat Pay public-key mode: the key's PUB_KEY_ID_… id.
    #[arg(long)]
    public_key_id: Option<String>,
    /// WeChat Pay APIv3 key file (needed to decrypt the resource).
    #[arg(long)]
    api_v3_key: Option<PathBuf>,
    /// Alipay root certificate bundle, to print alipay_root_cert_sn.
    #[arg(long)]
    root_cert: Option<PathBuf>,
    /// File with the request headers, one `Name: value` per line (WeChat Pay APIv3).
    #[arg(long)]
    headers: Option<PathBuf>,
    /// Check the timestamp against this unix time instead of now (for captured requests).
    #[arg(long)]
    now: Option<i64>,
    /// WeChat Pay APIv3 timestamp window (default 5m).
    #[arg(long)]
    max_clock_skew: Option<String>,
    /// The raw request body, byte for byte.
    body: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn verify(args: VerifyArgs) -> Result<bool, String> {
    let headers = match &args.headers {
        Some(p) => inspect::parse_headers(&String::from_utf8_lossy(&read(p)?))
            .map_err(|e| e.to_string())?,
        None => http::HeaderMap::new(),
    };
    let max_clock_skew = args
        .max_clock_skew
        .as_deref()
        .map(|d| GoDuration::parse(d).map(|d| d.0.as_secs() as i64))
        .transpose()?;
    let request = VerifyRequest {
        provider: match args.provider {
            Provider::Alipay => ProviderKind::Alipay,
            Provider::WechatpayV2 => ProviderKind::WechatPayV2,
            Provider::WechatpayV3 => ProviderKind::WechatPayV3,
        },
        keys: args
            .keys
            .iter()
            .map(|p| read(p))
            .collect::<Result<_, _>>()?,
        sign_type: args.sign_type,
        app_id: args.app_id,
        mch_id: args.mch_id,
        public_key_id: args.public_key_id,
        api_v3_key: args.api_v3_key.as_deref().map(read).transpose()?,
        root_certificate: args.root_cert.as_deref().map(read).transpose()?,
        headers,
        body: read(&args.body)?,
        now: args
            .now
            .unwrap_or_else(|| (paynotify::ingress::system_clock())()),
        max_clock_skew,
    };
    let (report, ok) = inspect::verify(&request).map_err(|e| e.to_string())?;
    print!("{report}");
    Ok(ok)
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

/// Runs a long-lived role on a tokio runtime and maps its result to an exit code.
fn run_role<E: std::fmt::Display>(
    role: impl std::future::Future<Output = Result<(), E>>,
) -> ExitCode {
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("paynotify: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(role) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paynotify: {e}");
            ExitCode::from(2)
        }
    }
}

async fn controller(args: ControllerArgs) -> Result<(), String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the Kubernetes API: {e}"))?;
    let config = paynotify::controller::ControllerConfig {
        namespace: args.namespace,
        watch_namespaces: args
            .watch_namespaces
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect(),
        table_secret: args.table_secret,
        lease_name: args.lease_name,
        identity: args.identity,
        lease_duration: std::time::Duration::from_secs(args.lease_seconds),
        cluster_domain: args.cluster_domain,
        public_base_url: args.public_base_url,
        admin_listen: args.admin_listen,
    };
    let shutdown = paynotify::ingress::server::termination().map_err(|e| e.to_string())?;
    paynotify::controller::run(client, config, shutdown)
        .await
        .map_err(|e| e.to_string())
}

async fn ingress(args: IngressArgs) -> Result<(), String> {
    use paynotify::ingress::{Ingress, Limits, cluster, server, system_clock};
    let request_timeout = GoDuration::parse(&args.request_timeout)?.0;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the Kubernetes API: {e}"))?;
    let ingress = Ingress::new(
        Limits {
            max_body_bytes: args.max_body_bytes,
            request_timeout,
        },
        paynotify::delivery::dedup::Dedup::new(
            paynotify::config::MIN_DEDUP_RETENTION,
            args.dedup_max_entries,
        ),
        paynotify::delivery::Forwarder::new().map_err(|e| e.to_string())?,
        system_clock(),
    );
    if args.admin_replay {
        ingress.enable_replay_endpoint();
    }
    use paynotify::delivery::queue::Backend;
    let backend = match (&args.store, args.nats.settings()) {
        (Some(_), Some(_)) => return Err("give --store or --nats-url, not both".into()),
        (Some(path), None) => Some(Backend::Embedded(
            paynotify::delivery::store::Store::open(path, args.store_max_bytes)
                .map_err(|e| e.to_string())?,
        )),
        (None, Some(settings)) => Some(Backend::JetStream(
            paynotify::delivery::jetstream::JetStream::connect(settings?)
                .await
                .map_err(|e| e.to_string())?,
        )),
        (None, None) => None,
    };
    let dispatcher = match backend {
        Some(store) => {
            let queue = paynotify::delivery::queue::Queue {
                store,
                wake: std::sync::Arc::new(tokio::sync::Notify::new()),
                retention: paynotify::config::MIN_DEDUP_RETENTION,
                dead_letter_retention: std::time::Duration::from_secs(7 * 86400),
            };
            ingress.attach_queue(queue.clone());
            Some(paynotify::delivery::queue::dispatch(ingress.clone(), queue))
        }
        None => None,
    };
    let source = cluster::TableSource {
        namespace: args.namespace,
        name: args.table_secret,
    };
    let follow = {
        let ingress = ingress.clone();
        async move {
            if let Some(dispatcher) = dispatcher {
                tokio::spawn(dispatcher);
            }
            cluster::follow(client, source, ingress).await
        }
    };
    let shutdown = server::termination().map_err(|e| e.to_string())?;
    server::serve_until(ingress, args.listen, args.admin_listen, follow, shutdown)
        .await
        .map_err(|e| e.to_string())
}

/// Opens the store named on the command line and turns the selection into a selector.
async fn open_store(
    selection: StoreSelection,
    include_delivered: bool,
    require_filter: bool,
) -> Result<
    (
        paynotify::delivery::queue::Backend,
        paynotify::delivery::store::Selector,
    ),
    String,
> {
    use paynotify::delivery::jetstream::JetStream;
    use paynotify::delivery::queue::Backend;
    use paynotify::delivery::store::{Selector, Store};
    let embedded = |path: PathBuf, max: u64| {
        if !path.exists() {
            return Err(format!("no store at {}", path.display()));
        }
        Store::open(&path, max)
            .map(Backend::Embedded)
            .map_err(|e| e.to_string())
    };
    let backend = match (selection.store, selection.config, selection.nats.settings()) {
        (Some(path), _, _) => embedded(path, u64::MAX / 2)?,
        (None, _, Some(settings)) => Backend::JetStream(
            JetStream::open(settings?)
                .await
                .map_err(|e| e.to_string())?,
        ),
        (None, Some(config), None) => {
            let store = paynotify::config::load(&config)
                .map_err(|e| e.to_string())?
                .server
                .store;
            match store.nats {
                Some(settings) => {
                    Backend::JetStream(JetStream::open(settings).await.map_err(|e| e.to_string())?)
                }
                None => embedded(store.path, store.max_size_bytes)?,
            }
        }
        (None, None, None) => {
            return Err("give --config FILE, --store FILE or --nats-url URL".into());
        }
    };
    let selector = if !require_filter && selection.ids.is_empty() && selection.route.is_none() {
        Selector::default()
    } else {
        Selector::parse(
            selection.ids,
            selection.route,
            selection.since.as_deref(),
            selection.until.as_deref(),
            include_delivered,
        )?
    };
    Ok((backend, selector))
}

async fn events(args: EventsArgs) -> Result<(), String> {
    let (store, selector) = open_store(args.selection, false, false).await?;
    for event in store
        .events(selector, args.limit)
        .await
        .map_err(|e| e.to_string())?
    {
        println!(
            "{}",
            serde_json::to_string(&event).map_err(|e| e.to_string())?
        );
    }
    Ok(())
}

async fn replay(args: ReplayArgs) -> Result<(), String> {
    let (store, selector) = open_store(args.selection, args.include_delivered, true).await?;
    let n = store.replay(selector).await.map_err(|e| e.to_string())?;
    println!("re-queued {n} deliveries");
    Ok(())
}

/// Runs a short command on a small runtime.
fn run_command(command: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("paynotify: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paynotify: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => run_role(paynotify::ingress::server::serve(config)),
        Command::Controller(args) => run_role(controller(args)),
        Command::Ingress(args) => run_role(ingress(args)),
        Command::Events(args) => run_command(events(args)),
        Command::Replay(args) => run_command(replay(args)),
        Command::Crd => match paynotify::crd::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("paynotify crd: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Verify(args) => match verify(*args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("paynotify verify: {e}");
                ExitCode::from(2)
            }
        },
    }
}
