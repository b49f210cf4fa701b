#!/usr/bin/env bash
# The side-by-side benchmark of paynotify and the GoPay reference peer (docs/benchmarks.md).
#
#   bash bench/run.sh           full run: release builds, criterion microbenchmarks, and the
#                               load runs; rewrites the results section of docs/benchmarks.md
#   bash bench/run.sh --smoke   a few seconds of load with debug builds; proves the pipeline
#                               works and prints the table (scripts/test.sh runs this)
#
# Both modes then run `paynotify-bench stores`: durable appends on paynotify's SQLite store
# against redb, with and without group commit (full: about 4 minutes, and it rewrites the
# store results section of docs/benchmarks.md; smoke: a few seconds, timings not checked).
#
# The server under test is pinned to core 0; the load generator and the sink to core 1.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=full
[ "${1:-}" = "--smoke" ] && mode=smoke
for tool in cargo go taskset getconf; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required by the benchmark" >&2; exit 1; }
done
[ "$(getconf _NPROCESSORS_ONLN)" -ge 2 ] || { echo "error: the benchmark needs two cores" >&2; exit 1; }

peer=$(bash bench/peers/gopay/build.sh)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "$mode" = full ]; then
  cargo build --release --locked -p paynotify -p paynotify-bench
  cargo bench --locked -p paynotify --bench verify
  bin=target/release
  out=docs/benchmarks.md
  extra=(--criterion target/criterion)
else
  cargo build --locked -p paynotify -p paynotify-bench
  bin=target/debug
  out="$work/benchmarks.md"
  extra=()
fi

taskset -c 1 "$bin/paynotify-bench" run --mode "$mode" --server-core 0 \
  --paynotify "$bin/paynotify" --peer "$peer" --work "$work" --out "$out" "${extra[@]}"

# The store files go on the disk the repository is on (not /tmp, which may be tmpfs, where
# an fsync costs nothing).
stores_dir=target/store-bench
rm -rf "$stores_dir"
if [ "$mode" = full ]; then
  "$bin/paynotify-bench" stores --mode full --dir "$stores_dir" --out "$out"
else
  "$bin/paynotify-bench" stores --mode smoke --dir "$stores_dir" --out "$work/stores.md"
fi
rm -rf "$stores_dir"

if [ "$mode" = smoke ]; then
  cat "$out" "$work/stores.md"
  for server in paynotify "GoPay peer"; do
    rows=$(grep -c "| $server |" "$out" || true)
    [ "$rows" -eq 4 ] || { echo "error: expected 4 table rows for $server, found $rows" >&2; exit 1; }
  done
  # 2 producer counts × 2 commit modes per engine; the probes' rows follow.
  for store in 'SQLite (paynotify `Store`)' 'redb, ExclusiveWriter (default)' 'redb, MultiWriter'; do
    rows=$(grep -cF "| $store | " "$work/stores.md" || true)
    [ "$rows" -eq 5 ] || { echo "error: expected 5 store rows for $store, found $rows" >&2; exit 1; }
  done
  grep -qF '| SQLite (paynotify `Store`): another process opens it like `paynotify events` | opened; sees 10 events |' \
    "$work/stores.md" || { echo "error: the SQLite multi-process probe did not open the store" >&2; exit 1; }
  echo "benchmark smoke run: ok"
fi
