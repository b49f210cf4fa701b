//! The side-by-side run: one sink, then for each server and provider a fixed-rate run and a
//! search for the highest sustainable rate, each on a freshly started server pinned to one
//! core while this process (the load generator) and the sink share the other.

use crate::Error;
use crate::corpus::{Corpus, PROVIDERS, WEBHOOK_SECRET};
use crate::load::{self, LoadResult};
use crate::proc_stats;
use crate::report::{self, Measurement};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Sustainable means p99 under this many milliseconds (and no errors).
pub const P99_LIMIT_MS: f64 = 50.0;

/// Arguments of `paynotify-bench run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// `smoke` runs a few seconds and proves the pipeline; `full` measures.
    #[arg(long, value_parser = ["smoke", "full"])]
    mode: String,
    /// The paynotify binary.
    #[arg(long)]
    paynotify: PathBuf,
    /// The GoPay peer binary.
    #[arg(long)]
    peer: PathBuf,
    /// Scratch directory for configs and logs.
    #[arg(long)]
    work: PathBuf,
    /// Markdown file to write; its results section is replaced if it has the markers.
    #[arg(long)]
    out: PathBuf,
    /// criterion's output directory, for the microbenchmark table.
    #[arg(long)]
    criterion: Option<PathBuf>,
    /// The core servers run on (this process and the sink should be pinned elsewhere).
    #[arg(long, default_value_t = 0)]
    server_core: usize,
    /// The core this process and the sink are pinned to (reported, to tell a client-bound
    /// result from a server-bound one).
    #[arg(long, default_value_t = 1)]
    client_core: usize,
    /// Only this route path (e.g. /alipay) and only paynotify: for profiling one case.
    #[arg(long)]
    only: Option<String>,
}

/// The knobs of one mode.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Notifications signed per provider.
    pub corpus: usize,
    /// The fixed rate for latency, CPU and memory.
    pub fixed_rate: f64,
    /// How long the fixed-rate run lasts.
    pub fixed_secs: f64,
    /// First rate of the search.
    pub search_start: f64,
    /// Longest search step.
    pub step_secs: f64,
    /// Highest rate tried.
    pub search_cap: f64,
    /// Bisection steps after the first failure.
    pub bisect: usize,
}

impl Plan {
    fn of(mode: &str) -> Plan {
        match mode {
            "full" => Plan {
                corpus: 60_000,
                fixed_rate: 1000.0,
                fixed_secs: 10.0,
                search_start: 1000.0,
                step_secs: 4.0,
                search_cap: 64_000.0,
                bisect: 4,
            },
            _ => Plan {
                corpus: 300,
                fixed_rate: 200.0,
                fixed_secs: 0.5,
                search_start: 100.0,
                step_secs: 0.3,
                search_cap: 200.0,
                bisect: 0,
            },
        }
    }
}

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// paynotify serve.
    Paynotify,
    /// The GoPay reference peer.
    GoPay,
}

impl Server {
    /// Table label.
    pub fn label(self) -> &'static str {
        match self {
            Server::Paynotify => "paynotify",
            Server::GoPay => "GoPay peer",
        }
    }
}

struct Running {
    child: Child,
    port: u16,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) -> Result<(), Error> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) -> Result<(), Error> {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait()? {
            return Err(format!("{what} exited during start: {status}").into());
        }
        if start.elapsed() > Duration::from_secs(20) {
            return Err(format!("{what} did not start listening on {port}").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

struct Setup {
    args: RunArgs,
    sink_url: String,
    sink_port: u16,
}

impl Setup {
    fn start(&self, server: Server, corpus: &Corpus) -> Result<Running, Error> {
        let port = free_port()?;
        let core = self.args.server_core.to_string();
        let (bin, config_args, log) = match server {
            Server::Paynotify => {
                let config = self.args.work.join("paynotify.yaml");
                corpus.write_paynotify_config(&config, port, free_port()?, &self.sink_url)?;
                (
                    &self.args.paynotify,
                    vec![
                        "serve".to_string(),
                        "--config".into(),
                        config.display().to_string(),
                    ],
                    "paynotify.log",
                )
            }
            Server::GoPay => {
                let config = self.args.work.join("gopay-peer.json");
                corpus.write_peer_config(&config, port, &self.sink_url)?;
                (
                    &self.args.peer,
                    vec!["-config".to_string(), config.display().to_string()],
                    "gopay-peer.log",
                )
            }
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.args.work.join(log))?;
        let mut child = Command::new("taskset")
            .args(["-c", &core])
            .arg(bin)
            .args(&config_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        wait_for_port(port, &mut child, server.label())?;
        Ok(Running { child, port })
    }
}

/// Runs `f` against a fresh server, checking with the sink that every answered
/// notification was delivered as a valid signed event.
fn measured(
    setup: &Setup,
    server: Server,
    corpus: &Corpus,
    provider: usize,
    rate: f64,
    secs: f64,
    runtime: &tokio::runtime::Runtime,
) -> Result<(LoadResult, f64, f64), Error> {
    let notifications = &corpus.notifications[provider];
    let count = ((rate * secs) as usize).clamp(1, notifications.len());
    let running = setup.start(server, corpus)?;
    sink_call(runtime, setup.sink_port, "POST", "/reset")?;
    let cpu_before = proc_stats::cpu_seconds(running.pid())?;
    let client_before = proc_stats::cpu_jiffies(setup.args.client_core)?;
    let url = format!("http://127.0.0.1:{}", running.port);
    let path = PROVIDERS[provider].path;
    let mut result = runtime.block_on(load::run(&url, path, &notifications[..count], rate))?;
    let client_after = proc_stats::cpu_jiffies(setup.args.client_core)?;
    result.client_core_busy = proc_stats::busy_fraction(client_before, client_after);
    let cpu = proc_stats::cpu_seconds(running.pid())? - cpu_before;
    let rss = proc_stats::peak_rss_mib(running.pid())?;
    running.stop()?;
    let stats = sink_call(runtime, setup.sink_port, "GET", "/stats")?;
    let (valid, invalid) = (
        stats["valid"].as_u64().unwrap_or(0),
        stats["invalid"].as_u64().unwrap_or(0),
    );
    if invalid > 0 || valid < result.ok {
        return Err(format!(
            "{} {}: the sink saw {valid} valid and {invalid} invalid events for {} success answers",
            server.label(),
            PROVIDERS[provider].name,
            result.ok
        )
        .into());
    }
    Ok((result, cpu, rss))
}

fn sink_call(
    runtime: &tokio::runtime::Runtime,
    port: u16,
    method: &str,
    path: &str,
) -> Result<serde_json::Value, Error> {
    use http_body_util::{BodyExt, Empty};
    runtime.block_on(async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<bytes::Bytes>>();
        let request = http::Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{port}{path}"))
            .body(Empty::new())?;
        let body = client
            .request(request)
            .await?
            .into_body()
            .collect()
            .await?
            .to_bytes();
        Ok(if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body)?
        })
    })
}

/// The highest sustainable rate found, and how busy the client core was at that rate.
#[derive(Debug, Clone, Copy, Default)]
pub struct MaxRate {
    /// Notifications per second.
    pub rate: f64,
    /// Busy fraction of the load generator's core during that step.
    pub client_core_busy: f64,
}

/// Finds the highest rate that stays sustainable: doubling, then bisecting.
fn search(
    setup: &Setup,
    server: Server,
    corpus: &Corpus,
    provider: usize,
    plan: &Plan,
    runtime: &tokio::runtime::Runtime,
) -> Result<MaxRate, Error> {
    let notifications = corpus.notifications[provider].len() as f64;
    let try_rate = |rate: f64| -> Result<Option<MaxRate>, Error> {
        let secs = plan.step_secs.min(notifications / rate).max(0.2);
        let (result, _, _) = measured(setup, server, corpus, provider, rate, secs, runtime)?;
        let ok = result.sustainable(P99_LIMIT_MS);
        eprintln!(
            "  {} {} at {rate:.0}/s for {secs:.1}s: p99 {:.2} ms, {} errors, client core {:.0}% busy → {}",
            server.label(),
            PROVIDERS[provider].name,
            result.ms(0.99),
            result.errors,
            result.client_core_busy * 100.0,
            if ok { "sustained" } else { "not sustained" }
        );
        Ok(ok.then_some(MaxRate {
            rate,
            client_core_busy: result.client_core_busy,
        }))
    };
    let mut good = MaxRate::default();
    let mut bad = None;
    let mut rate = plan.search_start;
    while rate <= plan.search_cap {
        match try_rate(rate)? {
            Some(found) => {
                good = found;
                rate *= 2.0;
            }
            None => {
                bad = Some(rate);
                break;
            }
        }
    }
    if let Some(mut hi) = bad {
        for _ in 0..plan.bisect {
            let mid = ((good.rate + hi) / 2.0 / 100.0).round() * 100.0;
            if mid <= good.rate || mid >= hi {
                break;
            }
            match try_rate(mid)? {
                Some(found) => good = found,
                None => hi = mid,
            }
        }
    }
    Ok(good)
}

/// Runs the benchmark and writes the report.
pub fn run(args: RunArgs) -> Result<(), Error> {
    let plan = Plan::of(&args.mode);
    std::fs::create_dir_all(&args.work)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    eprintln!("signing {} notifications per provider…", plan.corpus);
    let corpus = Corpus::generate(plan.corpus, now)?;
    let sink_port = free_port()?;
    let mut sink = Command::new(std::env::current_exe()?)
        .args([
            "sink",
            "--listen",
            &format!("127.0.0.1:{sink_port}"),
            "--secret",
            WEBHOOK_SECRET,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    wait_for_port(sink_port, &mut sink, "sink")?;
    let _sink = Running {
        child: sink,
        port: sink_port,
    };
    let setup = Setup {
        sink_url: format!("http://127.0.0.1:{sink_port}/events"),
        sink_port,
        args,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut measurements = Vec::new();
    let only = setup.args.only.clone();
    for (provider, p) in PROVIDERS
        .iter()
        .enumerate()
        .filter(|(_, p)| only.as_deref().is_none_or(|o| o == p.path))
    {
        let servers: &[Server] = if only.is_some() {
            &[Server::Paynotify]
        } else {
            &[Server::Paynotify, Server::GoPay]
        };
        for &server in servers {
            eprintln!(
                "{} / {}: fixed rate {:.0}/s",
                server.label(),
                p.name,
                plan.fixed_rate
            );
            let (fixed, cpu, rss) = measured(
                &setup,
                server,
                &corpus,
                provider,
                plan.fixed_rate,
                plan.fixed_secs,
                &runtime,
            )?;
            let max = search(&setup, server, &corpus, provider, &plan, &runtime)?;
            measurements.push(Measurement {
                provider: p.name,
                server,
                fixed,
                cpu_seconds: cpu,
                peak_rss_mib: rss,
                max,
            });
        }
    }
    let micro = match &setup.args.criterion {
        Some(dir) => Some(report::micro_table(dir)?),
        None => None,
    };
    let section = report::render(
        &setup.args.mode,
        &plan,
        &measurements,
        micro.as_deref(),
        &setup.args.peer,
    )?;
    report::write_section(&setup.args.out, &section, BEGIN, END)?;
    eprintln!("report written to {}", setup.args.out.display());
    Ok(())
}

const BEGIN: &str = "<!-- results:begin -->";
const END: &str = "<!-- results:end -->";
