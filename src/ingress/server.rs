//! Listeners, signals and reloads around the ingress: `paynotify serve`.

use super::{Ingress, Limits, system_clock};
use crate::config::{self, ConfigError, ServerSettings};
use crate::delivery::Forwarder;
use crate::delivery::dedup::Dedup;
use crate::table::{self, CompileErrors, RoutingTable};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long in-flight requests get to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Slow clients get this long to send their request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `serve` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The config file was refused at start.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The routes did not compile.
    #[error("invalid routes:\n{0}")]
    Compile(#[from] CompileErrors),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the delivery client: {0}")]
    Client(#[from] reqwest::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The store could not be opened.
    #[error(transparent)]
    Store(crate::delivery::store::StoreError),
}

/// Loads and compiles the config file, numbering the table `generation`.
pub fn load_table(
    path: &Path,
    generation: u64,
) -> Result<(ServerSettings, RoutingTable), ServeError> {
    let loaded = config::load(path)?;
    let mut document = loaded.document;
    document.generation = generation;
    Ok((loaded.server, table::compile(&document)?))
}

/// Runs the standalone ingress until SIGTERM or SIGINT; SIGHUP reloads `config_path`.
pub async fn serve(config_path: PathBuf) -> Result<(), ServeError> {
    let (settings, table) = load_table(&config_path, 1)?;
    let ingress = Ingress::new(
        Limits {
            max_body_bytes: settings.max_body_bytes,
            request_timeout: settings.request_timeout,
        },
        Dedup::new(settings.dedup_retention, settings.dedup_max_entries),
        Forwarder::new()?,
        system_clock(),
    );
    let queued = has_queued_routes(&table);
    ingress.install(table);
    if settings.admin_replay {
        ingress.enable_replay_endpoint();
    }
    let dispatcher = if queued {
        let queue = open_queue(&settings).await?;
        ingress.attach_queue(queue.clone());
        Some(crate::delivery::queue::dispatch(ingress.clone(), queue))
    } else {
        None
    };
    let mut hup = signal(tokio::signal::unix::SignalKind::hangup())?;
    let background = {
        let ingress = ingress.clone();
        let settings = settings.clone();
        async move {
            if let Some(dispatcher) = dispatcher {
                tokio::spawn(dispatcher);
            }
            let mut generation = 1;
            while hup.recv().await.is_some() {
                generation += 1;
                reload(&ingress, &config_path, generation, &settings);
            }
        }
    };
    serve_until(
        ingress,
        settings.listen,
        settings.admin_listen,
        background,
        termination()?,
    )
    .await
}

fn has_queued_routes(table: &RoutingTable) -> bool {
    table
        .routes()
        .any(|r| r.mode == crate::spec::DeliveryMode::Queued)
}

/// Opens the store of the config file: JetStream when `store.nats` is set, else the file.
pub async fn open_queue(
    settings: &ServerSettings,
) -> Result<crate::delivery::queue::Queue, ServeError> {
    use crate::delivery::queue::Backend;
    let store = match &settings.store.nats {
        Some(nats) => {
            let js = crate::delivery::jetstream::JetStream::connect(nats.clone())
                .await
                .map_err(ServeError::Store)?;
            tracing::info!(url = %nats.url, stream = %nats.stream, "JetStream store selected");
            Backend::JetStream(js)
        }
        None => {
            let store = crate::delivery::store::Store::open(
                &settings.store.path,
                settings.store.max_size_bytes,
            )
            .map_err(ServeError::Store)?;
            tracing::info!(path = %settings.store.path.display(), "embedded store open");
            Backend::Embedded(store)
        }
    };
    Ok(crate::delivery::queue::Queue {
        store,
        wake: Arc::new(tokio::sync::Notify::new()),
        retention: settings.dedup_retention,
        dead_letter_retention: settings.store.dead_letter_retention,
    })
}

/// Resolves on SIGTERM or SIGINT.
pub fn termination() -> Result<impl std::future::Future<Output = ()>, ServeError> {
    let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    })
}

/// Serves `ingress` on its two listeners, running `background` beside it, until `shutdown`
/// resolves; then readiness fails, the listeners close and requests in flight drain.
pub async fn serve_until(
    ingress: Arc<Ingress>,
    listen: SocketAddr,
    admin_listen: SocketAddr,
    background: impl std::future::Future<Output = ()> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let listener = bind(listen).await?;
    let admin = bind(admin_listen).await?;
    tracing::info!(listen = %listen, admin = %admin_listen, routes = ingress.table().len(), "paynotify serving");
    let (stop_tx, stop_rx) = watch::channel(false);
    let main = tokio::spawn(run_listener(listener, ingress.router(), stop_rx.clone()));
    let admin_task = tokio::spawn(run_listener(admin, ingress.admin_router(), stop_rx));
    let background = tokio::spawn(background);
    shutdown.await;
    tracing::info!("shutting down: draining requests in flight");
    ingress.start_draining();
    background.abort();
    let _ = stop_tx.send(true);
    let _ = main.await;
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Re-reads the config; a bad file is refused and counted, and the old table keeps serving.
pub fn reload(ingress: &Ingress, path: &Path, generation: u64, running: &ServerSettings) {
    match load_table(path, generation) {
        Ok((_, table)) if has_queued_routes(&table) && ingress.queue().is_none() => {
            ingress.metrics.reload_errors.inc();
            tracing::error!(
                "reload refused: a route became Queued; restart paynotify to open the store"
            );
        }
        Ok((settings, table)) => {
            if settings != *running {
                tracing::warn!(
                    "listener, limit and dedup settings change only on restart; routes were reloaded"
                );
            }
            let routes = table.len();
            ingress.install(table);
            ingress.metrics.reloads.inc();
            tracing::info!(generation, routes, "routing table reloaded");
        }
        Err(e) => {
            ingress.metrics.reload_errors.inc();
            tracing::error!(error = %e, "reload refused; the previous routing table keeps serving");
        }
    }
}

fn signal(
    kind: tokio::signal::unix::SignalKind,
) -> Result<tokio::signal::unix::Signal, ServeError> {
    tokio::signal::unix::signal(kind).map_err(ServeError::Signals)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Accepts connections until `stop` turns true, then waits for open connections to finish
/// (at most [`DRAIN_TIMEOUT`]).
pub async fn run_listener(
    listener: TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(router.clone());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: closing connections still open");
    }
}
