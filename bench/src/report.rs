//! The markdown report: the side-by-side table, the ratios and the microbenchmarks.

use crate::Error;
use crate::load::LoadResult;
use crate::run::{P99_LIMIT_MS, Plan, Server};
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

/// Everything measured for one server and provider.
pub struct Measurement {
    /// Provider label.
    pub provider: &'static str,
    /// Which server.
    pub server: Server,
    /// The fixed-rate run.
    pub fixed: LoadResult,
    /// CPU seconds the server used during the fixed-rate run.
    pub cpu_seconds: f64,
    /// Peak RSS of the server after the fixed-rate run.
    pub peak_rss_mib: f64,
    /// Highest sustainable rate found.
    pub max: crate::run::MaxRate,
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The GoPay version compiled into the peer, from its embedded build information.
fn gopay_version(peer: &Path) -> String {
    let info = command_line("go", &["version", "-m", &peer.display().to_string()]);
    info.lines()
        .find(|l| l.contains("github.com/go-pay/gopay") && l.trim_start().starts_with("dep"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("unknown")
        .to_string()
}

/// Renders the generated part of docs/benchmarks.md.
pub fn render(
    mode: &str,
    plan: &Plan,
    ms: &[Measurement],
    micro: Option<&str>,
    peer: &Path,
) -> Result<String, Error> {
    let mut out = String::new();
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    writeln!(out, "### Results ({mode} run, {date})\n")?;
    // This process is pinned to one core: count the machine's cores from /proc.
    let cores = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    writeln!(
        out,
        "- Machine: {cores} cores, {}, Linux {}",
        cpu_model(),
        command_line("uname", &["-r"])
    )?;
    writeln!(
        out,
        "- Versions: {}; {}; {}; GoPay {}",
        command_line("git", &["describe", "--always", "--dirty"]).replace('\n', " "),
        command_line("rustc", &["-V"]),
        command_line("go", &["version"]),
        gopay_version(peer)
    )?;
    writeln!(
        out,
        "- Plan: {} signed notifications per provider; fixed rate {:.0}/s for {:.1} s; search from {:.0}/s (×2, then {} bisections, cap {:.0}/s, steps of at most {:.1} s); sustainable = no errors, p99 < {P99_LIMIT_MS} ms, ≥ 90% of the rate served. Delivery mode: Synchronous.\n",
        plan.corpus,
        plan.fixed_rate,
        plan.fixed_secs,
        plan.search_start,
        plan.bisect,
        plan.search_cap,
        plan.step_secs
    )?;
    writeln!(
        out,
        "| Provider | Server | Max sustainable (notifications/s) | Client core busy at max | p50 ms @{0:.0}/s | p99 ms @{0:.0}/s | p99.9 ms @{0:.0}/s | CPU s per 1000 | Peak RSS MiB |",
        plan.fixed_rate
    )?;
    writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for m in ms {
        let cap = if m.max.rate >= plan.search_cap {
            "≥ "
        } else {
            ""
        };
        writeln!(
            out,
            "| {} | {} | {cap}{:.0} | {:.0}% | {:.2} | {:.2} | {:.2} | {:.3} | {:.1} |",
            m.provider,
            m.server.label(),
            m.max.rate,
            m.max.client_core_busy * 100.0,
            m.fixed.ms(0.5),
            m.fixed.ms(0.99),
            m.fixed.ms(0.999),
            m.cpu_seconds / m.fixed.ok.max(1) as f64 * 1000.0,
            m.peak_rss_mib
        )?;
    }
    writeln!(
        out,
        "\n| Provider | Throughput paynotify / GoPay | CPU per notification GoPay / paynotify | p99 @{:.0}/s paynotify / GoPay |",
        plan.fixed_rate
    )?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for pair in ms.chunks(2) {
        if let [p, g] = pair {
            let ratio = |a: f64, b: f64| {
                if b > 0.0 {
                    format!("{:.2}", a / b)
                } else {
                    "n/a".into()
                }
            };
            let cpu_p = p.cpu_seconds / p.fixed.ok.max(1) as f64;
            let cpu_g = g.cpu_seconds / g.fixed.ok.max(1) as f64;
            writeln!(
                out,
                "| {} | {} | {} | {} |",
                p.provider,
                ratio(p.max.rate, g.max.rate),
                ratio(cpu_g, cpu_p),
                ratio(p.fixed.ms(0.99), g.fixed.ms(0.99))
            )?;
        }
    }
    match micro {
        Some(table) => writeln!(out, "\n{table}")?,
        None => writeln!(
            out,
            "\nMicrobenchmarks: not run in this mode (`bench/run.sh` runs them in full mode)."
        )?,
    }
    Ok(out)
}

/// Reads criterion's estimates and renders adapter / raw-crypto ratios.
pub fn micro_table(dir: &Path) -> Result<String, Error> {
    let mean_ns = |group: &str, function: &str| -> Result<f64, Error> {
        let path = dir.join(group).join(function).join("new/estimates.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        v["mean"]["point_estimate"]
            .as_f64()
            .ok_or_else(|| format!("{}: no mean", path.display()).into())
    };
    let mut out = String::from(
        "| Verify path (criterion, mean) | Adapter µs | Raw crypto µs | Ratio adapter / raw |\n|---|---:|---:|---:|\n",
    );
    for (group, label, raw) in [
        ("alipay_rsa2", "Alipay RSA2", "RSA-2048 verify"),
        ("wechatpay_v2_md5", "WeChat Pay v2 MD5", "MD5"),
        (
            "wechatpay_v2_hmac",
            "WeChat Pay v2 HMAC-SHA256",
            "HMAC-SHA256",
        ),
        (
            "wechatpay_v3",
            "WeChat Pay v3",
            "RSA-2048 verify + AES-256-GCM",
        ),
    ] {
        let adapter = mean_ns(group, "adapter")?;
        let crypto = mean_ns(group, "raw_crypto")?;
        writeln!(
            out,
            "| {label} (raw: {raw}) | {:.2} | {:.2} | {:.2} |",
            adapter / 1000.0,
            crypto / 1000.0,
            adapter / crypto
        )?;
    }
    Ok(out)
}

/// Replaces the part of `path` between the markers `begin` and `end`, or appends it with
/// its markers when they are missing (or writes it alone to a new file).
pub fn write_section(path: &Path, section: &str, begin: &str, end: &str) -> Result<(), Error> {
    let generated = format!("{begin}\n{section}{end}\n");
    let text = match std::fs::read_to_string(path) {
        Ok(old) => match (old.find(begin), old.find(end)) {
            (Some(a), Some(b)) if a < b => format!(
                "{}{generated}{}",
                &old[..a],
                old[b + end.len()..].trim_start_matches('\n')
            ),
            _ => format!("{old}\n{generated}"),
        },
        Err(_) => generated,
    };
    std::fs::write(path, text)?;
    Ok(())
}
