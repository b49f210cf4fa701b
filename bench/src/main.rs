//! `paynotify-bench`: the side-by-side benchmark of paynotify and a GoPay-based reference
//! handler. `bench/run.sh` is the entry point; see docs/benchmarks.md.

mod corpus;
mod load;
mod proc_stats;
mod report;
mod run;
mod sink;
mod stores;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "paynotify-bench",
    about = "Benchmark paynotify side by side with a GoPay reference handler"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole benchmark and write the report.
    Run(run::RunArgs),
    /// The downstream sink: counts and checks delivered events (started by `run`).
    Sink {
        /// Listen address.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The Standard Webhooks secret deliveries are signed with.
        #[arg(long)]
        secret: String,
    },
    /// Print the microbenchmark ratio table from criterion's results.
    Micro {
        /// criterion's output directory (target/criterion).
        #[arg(long)]
        criterion: PathBuf,
    },
    /// Durable appends: paynotify's SQLite store against redb, with and without group commit.
    Stores(stores::StoresArgs),
    /// One access to a store file held open by `stores` (started by `stores`).
    #[command(hide = true)]
    StoreProbe(stores::ProbeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Sink { listen, secret } => sink::serve(listen, &secret),
        Command::Micro { criterion } => report::micro_table(&criterion).map(|t| print!("{t}")),
        Command::Stores(args) => stores::run(args),
        Command::StoreProbe(args) => stores::probe(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paynotify-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Errors of this tool are reported to a human and end the run.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
