#!/usr/bin/env bash
# Builds (once) the kube-apiserver and etcd binaries that the Kubernetes integration tests
# run, and the nats-server that the JetStream tests of Queued delivery run, from the checksum-pinned wrapper modules in tools/kubebins/{k8s,etcd}, and prints
#
#   PAYNOTIFY_KUBE_APISERVER=<path>
#   PAYNOTIFY_ETCD=<path>
#   PAYNOTIFY_NATS_SERVER=<path>
#
# on stdout. Everything else (build logs, timings) goes to stderr, so a caller can do
#   eval "$(bash scripts/kubebins.sh)"; export PAYNOTIFY_KUBE_APISERVER PAYNOTIFY_ETCD
#
# Binaries are cached in
#   ${XDG_CACHE_HOME:-$HOME/.cache}/paynotify/kubebins/<component>-<version>-<key>/<component>
# where <key> is the first 12 hex digits of sha256(go.mod + go.sum + `go version`). A cached
# binary is only ever put in place by an atomic rename after it built and answered
# `--version` correctly, so an interrupted build leaves nothing half-written behind.
# A warm run (both cached) only hashes two small files per component: it takes milliseconds.
#
# Needs: go (1.26.x; the toolchain is never downloaded: GOTOOLCHAIN=local), the Go module
# proxy on a cold run, sha256sum. See docs/envtest.md.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$PWD

die() { echo "kubebins: error: $*" >&2; exit 1; }
log() { echo "kubebins: $*" >&2; }
# Turn signals into exits so that the EXIT trap in build() removes a half-written binary.
trap 'exit 130' INT
trap 'exit 143' TERM

command -v go >/dev/null 2>&1 || die "the 'go' command is required (Go 1.26.x on PATH) to build kube-apiserver and etcd"
command -v sha256sum >/dev/null 2>&1 || die "sha256sum (coreutils) is required"

export GOTOOLCHAIN=local
export CGO_ENABLED=0
# The committed go.sum is the truth: never let a build rewrite go.mod or go.sum.
export GOFLAGS=-mod=readonly

go_version=$(go version) || die "'go version' failed"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/paynotify/kubebins"

# module_version <go.mod> <module path>: the version that go.mod requires.
module_version() {
  local v
  v=$(awk -v m="$2" '($1 == m && $2 ~ /^v/) {print $2; exit} ($1 == "require" && $2 == m) {print $3; exit}' "$1")
  [[ -n $v ]] || die "$1 does not require $2"
  echo "$v"
}

# cache_dir <component> <version> <wrapper dir>
cache_dir() {
  local key
  key=$({ cat "$3/go.mod" "$3/go.sum"; printf '%s\n' "$go_version"; } | sha256sum | cut -c1-12)
  echo "$cache_root/$1-$2-$key"
}

# build <component> <wrapper dir> <package> <cache dir> <expected --version substring> [go build args...]
build() {
  local name=$1 wrapper=$2 pkg=$3 dir=$4 want=$5
  shift 5
  local bin="$dir/$name"
  [[ -x $bin ]] && return 0

  mkdir -p "$dir" || die "cannot create cache directory $dir"
  # One builder per component at a time (e.g. two test binaries that both run this script).
  if command -v flock >/dev/null 2>&1; then
    exec {lock_fd}>"$dir/.lock"
    if ! flock -n "$lock_fd"; then
      log "waiting for another build of $name in $dir"
      flock "$lock_fd"
    fi
    if [[ -x $bin ]]; then exec {lock_fd}>&-; return 0; fi
  fi

  local tmp
  rm -f "$dir/.$name.tmp."*   # left by a build that was SIGKILLed
  tmp=$(mktemp "$dir/.$name.tmp.XXXXXX")
  # Removed on any exit unless it was renamed into place.
  trap 'rm -f "'"$tmp"'"' EXIT
  log "building $name ($pkg) into $dir (cold on 2 cores: ~11 min for kube-apiserver, ~1 min for etcd)"
  local start=$SECONDS
  if ! (cd "$repo/$wrapper" && go build -trimpath -buildvcs=false "$@" -o "$tmp" "$pkg") >&2; then
    die "go build of $pkg failed (wrapper module $wrapper; see the messages above)"
  fi
  local out
  out=$("$tmp" --version 2>&1) || die "$name --version failed after the build: $out"
  [[ $out == *"$want"* ]] || die "$name --version printed '$out', expected it to contain '$want'"
  chmod 0755 "$tmp"
  mv -f "$tmp" "$bin"
  trap - EXIT
  log "built $name in $((SECONDS - start)) s, $(stat -c %s "$bin") bytes: ${out%%$'\n'*}"
  if [[ -n ${lock_fd:-} ]]; then exec {lock_fd}>&-; unset lock_fd; fi
}

# --- kube-apiserver -------------------------------------------------------------------
k8s_wrapper=tools/kubebins/k8s
k8s_version=$(module_version "$k8s_wrapper/go.mod" k8s.io/kubernetes)
k8s_dir=$(cache_dir kube-apiserver "$k8s_version" "$k8s_wrapper")
if [[ ! -x $k8s_dir/kube-apiserver ]]; then
  [[ $k8s_version =~ ^v([0-9]+)\.([0-9]+)\. ]] || die "unexpected k8s.io/kubernetes version $k8s_version"
  ldflags="-s -w"
  # The variables Kubernetes' own hack/lib/version.sh sets; without them /version and
  # --version report v0.0.0-master+$Format:%H$.
  for kv in "gitVersion=$k8s_version" "gitMajor=${BASH_REMATCH[1]}" "gitMinor=${BASH_REMATCH[2]}" \
    gitTreeState=clean "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
    ldflags+=" -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
  done
  # notest and grpcnotrace are tags Kubernetes' release build uses (hack/lib/golang.sh).
  build kube-apiserver "$k8s_wrapper" k8s.io/kubernetes/cmd/kube-apiserver "$k8s_dir" \
    "Kubernetes $k8s_version" -tags=notest,grpcnotrace -ldflags="$ldflags"
fi

# --- etcd -----------------------------------------------------------------------------
etcd_wrapper=tools/kubebins/etcd
etcd_version=$(module_version "$etcd_wrapper/go.mod" go.etcd.io/etcd/server/v3)
etcd_dir=$(cache_dir etcd "$etcd_version" "$etcd_wrapper")
if [[ ! -x $etcd_dir/etcd ]]; then
  build etcd "$etcd_wrapper" go.etcd.io/etcd/server/v3 "$etcd_dir" \
    "etcd Version: ${etcd_version#v}" -ldflags="-s -w"
fi

# --- nats-server (JetStream, for the Queued-delivery tests) ----------------------------
nats_wrapper=tools/kubebins/nats
nats_version=$(module_version "$nats_wrapper/go.mod" github.com/nats-io/nats-server/v2)
nats_dir=$(cache_dir nats-server "$nats_version" "$nats_wrapper")
if [[ ! -x $nats_dir/nats-server ]]; then
  build nats-server "$nats_wrapper" github.com/nats-io/nats-server/v2 "$nats_dir" \
    "nats-server: $nats_version" -ldflags="-s -w"
fi

echo "PAYNOTIFY_KUBE_APISERVER=$k8s_dir/kube-apiserver"
echo "PAYNOTIFY_ETCD=$etcd_dir/etcd"
echo "PAYNOTIFY_NATS_SERVER=$nats_dir/nats-server"
