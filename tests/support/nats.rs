//! A real `nats-server` with JetStream for tests: its own port and store directory,
//! `sync_interval: always` (every acknowledged message fsync'd, as a single-server
//! production setup must be), stop and restart on the same port and data, killed on drop.
//! The binary comes from `PAYNOTIFY_NATS_SERVER` (scripts/kubebins.sh builds it); without it
//! the test fails, it is never skipped.

use crate::support::free_port;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One nats-server process.
pub struct NatsServer {
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

fn binary() -> PathBuf {
    let path = std::env::var_os("PAYNOTIFY_NATS_SERVER").unwrap_or_else(|| {
        panic!(
            "PAYNOTIFY_NATS_SERVER is not set: run the tests through scripts/test.sh, or \
             eval \"$(bash scripts/kubebins.sh)\" and export PAYNOTIFY_NATS_SERVER"
        )
    });
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "PAYNOTIFY_NATS_SERVER={} does not exist",
        path.display()
    );
    path
}

impl NatsServer {
    /// Starts a fresh server and waits until it accepts connections.
    pub fn start(name: &str) -> NatsServer {
        Self::start_with(name, free_port(), "")
    }

    /// Starts three servers clustered with each other (JetStream replicas up to 3).
    pub fn cluster(name: &str) -> Vec<NatsServer> {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        (0..3)
            .map(|i| {
                let routes: Vec<String> = ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, (_, c))| format!("nats-route://127.0.0.1:{c}"))
                    .collect();
                let cluster = format!(
                    "cluster {{\n  name: paynotify-test-{name}\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    ports[i].1,
                    routes.join(", ")
                );
                Self::start_with(&format!("{name}-{i}"), ports[i].0, &cluster)
            })
            .collect()
    }

    fn start_with(name: &str, port: u16, extra: &str) -> NatsServer {
        let dir =
            std::env::temp_dir().join(format!("paynotify-nats-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "listen: 127.0.0.1:{port}\nserver_name: paynotify-test-{name}\n\
             jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n{extra}",
            dir.join("js").display()
        );
        std::fs::write(dir.join("nats.conf"), config).unwrap();
        let mut server = NatsServer {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            dir,
            child: None,
        };
        server.resume();
        server
    }

    /// Starts the server again on the same port and data.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats.log"))
            .unwrap();
        let child = Command::new(binary())
            .arg("-c")
            .arg(self.dir.join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start nats-server");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nats-server did not listen within 20 s; see {}",
                self.dir.join("nats.log").display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL: nothing is flushed that was not already).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
