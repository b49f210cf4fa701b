#!/usr/bin/env bash
# Runs every test of paynotify: formatting, lints, unit, vector, third-party fixture,
# HTTP-level, robustness and CLI tests. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "error: cargo is required (Rust 1.95)" >&2; exit 1; }
command -v kill >/dev/null || { echo "error: kill (procps) is required by the serve tests" >&2; exit 1; }

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "==> cargo test"
cargo test --locked --all-targets
echo "==> all tests passed"
