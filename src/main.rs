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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("paynotify: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(paynotify::ingress::server::serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("paynotify: {e}");
                    ExitCode::from(2)
                }
            }
        }
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
