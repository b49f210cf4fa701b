#!/usr/bin/env bash
# Runs every test of paynotify: formatting, lints, unit, vector, third-party fixture,
# HTTP-level, robustness, CLI, benchmark-smoke and real-control-plane tests. This is the
# README's test command; .ci/run calls it. It provisions what the tests need: kube-apiserver
# and etcd are built from the Go module proxy once and cached under ~/.cache/paynotify.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "error: cargo is required (Rust 1.95)" >&2; exit 1; }
for tool in kill go taskset getconf; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required by the tests" >&2; exit 1; }
done

echo "==> kube-apiserver and etcd for the operator tests, nats-server for JetStream (cached after the first build)"
# Assigned first: `eval "$(...)"` would not stop on a failed build under set -e.
kubebins=$(bash scripts/kubebins.sh)
eval "$kubebins"
export PAYNOTIFY_KUBE_APISERVER PAYNOTIFY_ETCD PAYNOTIFY_NATS_SERVER
echo "==> helm and promtool for the chart and alert tests, and the CRDs of the monitoring kinds (cached after the first build)"
# Assigned first: `eval "$(...)"` would not stop on a failed build under set -e.
helmtools=$(bash scripts/helmtools.sh)
eval "$helmtools"
export PAYNOTIFY_HELM PAYNOTIFY_PROMTOOL PAYNOTIFY_TEST_CRDS

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "==> cargo test"
cargo test --locked --workspace --all-targets
echo "==> GoPay reference peer: go vet and go test"
(cd bench/peers/gopay && GOTOOLCHAIN=local GOFLAGS=-mod=readonly go vet ./... && GOTOOLCHAIN=local GOFLAGS=-mod=readonly go test ./...)
echo "==> benchmark smoke run"
bash bench/run.sh --smoke
echo "==> all tests passed"
