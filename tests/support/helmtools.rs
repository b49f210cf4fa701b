//! The tools of scripts/helmtools.sh (helm, promtool, the monitoring CRDs) for the chart
//! and alert tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// A tool or path from scripts/helmtools.sh: `$var` if set, else the script's output (it
/// builds the tools on the first run). Never skips: a missing tool is a failure.
pub fn helmtool(var: &str) -> PathBuf {
    static SCRIPT: OnceLock<Result<BTreeMap<String, String>, String>> = OnceLock::new();
    let path = match std::env::var(var) {
        Ok(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            let vars = SCRIPT.get_or_init(|| {
                let out = Command::new("bash")
                    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/helmtools.sh"))
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .map_err(|e| format!("cannot run scripts/helmtools.sh: {e}"))?;
                if !out.status.success() {
                    return Err(format!("scripts/helmtools.sh failed ({})", out.status));
                }
                Ok(String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect())
            });
            let vars = vars.as_ref().unwrap_or_else(|e| {
                panic!("{var} is not set and {e}: run `bash scripts/helmtools.sh` and export what it prints")
            });
            PathBuf::from(
                vars.get(var)
                    .unwrap_or_else(|| panic!("scripts/helmtools.sh printed no {var}")),
            )
        }
    };
    assert!(
        path.exists(),
        "{var}={} does not exist: run `bash scripts/helmtools.sh` and export what it prints",
        path.display()
    );
    path
}
