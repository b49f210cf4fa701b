#!/usr/bin/env bash
# Builds (once) the `helm` and `promtool` binaries that the chart and alert-rule tests
# (tests/chart.rs, tests/alerts.rs) run, from the checksum-pinned wrapper modules in
# tools/helmtools/{helm,promtool}, and prints
#
#   PAYNOTIFY_HELM=<path>
#   PAYNOTIFY_PROMTOOL=<path>
#   PAYNOTIFY_TEST_CRDS=<directory with the ServiceMonitor, PrometheusRule and HTTPRoute CRDs>
#
# on stdout. Everything else (build logs, timings) goes to stderr. Under `set -e`, assign
# first, then eval (a failed build must stop the caller; `eval "$(...)"` would not):
#   helmtools=$(bash scripts/helmtools.sh); eval "$helmtools"; export PAYNOTIFY_HELM PAYNOTIFY_PROMTOOL
#
# Binaries are cached in
#   ${XDG_CACHE_HOME:-$HOME/.cache}/paynotify/<tool>-<version>-<key>/<tool>
# where <key> is the first 12 hex digits of sha256(go.mod + go.sum + `go version`), so a
# changed wrapper or Go gives a new directory (old ones are not removed). A cached binary is
# only put in place by an atomic rename after it built and printed the expected version (`helm version --short`,
# `promtool --version`), so
# an interrupted build leaves nothing half-written. A warm run takes milliseconds.
#
# Versions (from the wrappers' go.mod): helm.sh/helm/v4 v4.3.2, and
# github.com/prometheus/prometheus v0.316.0 (= Prometheus 3.16.0). Neither upstream go.mod
# has replace or exclude lines; the wrappers exist so that go.sum pins every dependency.
#
# Needs: go (1.26.x; never downloaded: GOTOOLCHAIN=local), the Go module proxy on a cold
# run, sha256sum. A failed build is an error (exit status 1), never a skip.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$PWD

die() { echo "helmtools: error: $*" >&2; exit 1; }
log() { echo "helmtools: $*" >&2; }
# Turn signals into exits so that the EXIT trap in build() removes a half-written binary.
trap 'exit 130' INT
trap 'exit 143' TERM

command -v go >/dev/null 2>&1 || die "the 'go' command is required (Go 1.26.x on PATH) to build helm and promtool"
command -v sha256sum >/dev/null 2>&1 || die "sha256sum (coreutils) is required"

export GOTOOLCHAIN=local
export CGO_ENABLED=0
# The committed go.sum is the truth: never let a build rewrite go.mod or go.sum.
export GOFLAGS=-mod=readonly

go_version=$(go version) || die "'go version' failed"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/paynotify"

# module_version <go.mod> <module path>: the version that go.mod requires.
module_version() {
  local v
  v=$(awk -v m="$2" '($1 == m && $2 ~ /^v/) {print $2; exit} ($1 == "require" && $2 == m) {print $3; exit}' "$1")
  [[ -n $v ]] || die "$1 does not require $2"
  echo "$v"
}

# cache_dir <tool> <version> <wrapper dir>
cache_dir() {
  local key
  key=$({ cat "$3/go.mod" "$3/go.sum"; printf '%s\n' "$go_version"; } | sha256sum | cut -c1-12)
  echo "$cache_root/$1-$2-$key"
}

# build <tool> <wrapper dir> <package> <cache dir> <version command, e.g. "version --short">
#       <expected substring of its output> [go build args...]
build() {
  local name=$1 wrapper=$2 pkg=$3 dir=$4 version_cmd=$5 want=$6
  shift 6
  local bin="$dir/$name"
  [[ -x $bin ]] && return 0

  mkdir -p "$dir" || die "cannot create cache directory $dir"
  # One builder per tool at a time (e.g. two test binaries that both run this script).
  if command -v flock >/dev/null 2>&1; then
    exec {lock_fd}>"$dir/.lock"
    if ! flock -n "$lock_fd"; then
      log "waiting for another build of $name in $dir"
      flock "$lock_fd"
    fi
    if [[ -x $bin ]]; then exec {lock_fd}>&-; unset lock_fd; return 0; fi
  fi

  local tmp
  rm -f "$dir/.$name.tmp."*   # left by a build that was SIGKILLed
  tmp=$(mktemp "$dir/.$name.tmp.XXXXXX")
  # Removed on any exit unless it was renamed into place.
  trap 'rm -f "'"$tmp"'"' EXIT
  log "building $name ($pkg) into $dir (cold on 2 cores: a few minutes each)"
  local start=$SECONDS
  if ! (cd "$repo/$wrapper" && go build -trimpath -buildvcs=false "$@" -o "$tmp" "$pkg") >&2; then
    die "go build of $pkg failed (wrapper module $wrapper; see the messages above)"
  fi
  local out
  # shellcheck disable=SC2086 # the version command is split on purpose
  out=$("$tmp" $version_cmd 2>&1) || die "$name $version_cmd failed after the build: $out"
  [[ $out == *"$want"* ]] || die "$name $version_cmd printed '$out', expected it to contain '$want'"
  chmod 0755 "$tmp"
  mv -f "$tmp" "$bin"
  trap - EXIT
  log "built $name in $((SECONDS - start)) s, $(stat -c %s "$bin") bytes: ${out%%$'\n'*}"
  if [[ -n ${lock_fd:-} ]]; then exec {lock_fd}>&-; unset lock_fd; fi
}

# --- helm -----------------------------------------------------------------------------
helm_wrapper=tools/helmtools/helm
helm_version=$(module_version "$helm_wrapper/go.mod" helm.sh/helm/v4)
helm_dir=$(cache_dir helm "$helm_version" "$helm_wrapper")
if [[ ! -x $helm_dir/helm ]]; then
  # The variables helm's own Makefile sets for a tagged release; without the version,
  # `helm version` prints only "v4.3".
  build helm "$helm_wrapper" helm.sh/helm/v4/cmd/helm "$helm_dir" "version --short" "$helm_version" \
    -ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$helm_version -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
fi

# --- promtool -------------------------------------------------------------------------
prom_wrapper=tools/helmtools/promtool
prom_module_version=$(module_version "$prom_wrapper/go.mod" github.com/prometheus/prometheus)
# Prometheus 3.x is published as Go module v0.3MM.P: v0.316.0 is Prometheus 3.16.0.
[[ $prom_module_version =~ ^v0\.([0-9])([0-9]{2})\.([0-9]+)$ ]] ||
  die "unexpected github.com/prometheus/prometheus version $prom_module_version"
prom_version="${BASH_REMATCH[1]}.$((10#${BASH_REMATCH[2]})).${BASH_REMATCH[3]}"
prom_dir=$(cache_dir promtool "v$prom_version" "$prom_wrapper")
if [[ ! -x $prom_dir/promtool ]]; then
  # remove_all_sd leaves out the cloud service-discovery plugins (AWS, Azure, GCE, ...):
  # `promtool check rules` and `promtool test rules` use none of them, and the build is
  # much smaller. The -X flags are those of Prometheus' .promu.yml.
  pv=github.com/prometheus/common/version
  build promtool "$prom_wrapper" github.com/prometheus/prometheus/cmd/promtool "$prom_dir" \
    --version "promtool, version $prom_version" -tags=netgo,remove_all_sd \
    -ldflags="-s -w -X $pv.Version=$prom_version -X $pv.Branch=HEAD -X $pv.Revision=$prom_module_version -X $pv.BuildUser=paynotify"
fi

# --- CRDs of the optional kinds the chart renders ----------------------------------------
# monitoring.coreos.com ServiceMonitor/PrometheusRule and gateway.networking.k8s.io
# HTTPRoute, copied from the module zips pinned by tools/helmtools/crds (go.sum-checked), so
# that tests/chart.rs can install them into the test apiserver and validate those objects
# too. Nothing is written by hand.
crd_wrapper=tools/helmtools/crds
po_version=$(module_version "$crd_wrapper/go.mod" github.com/prometheus-operator/prometheus-operator)
gw_version=$(module_version "$crd_wrapper/go.mod" sigs.k8s.io/gateway-api)
crd_dir=$(cache_dir test-crds "$po_version-$gw_version" "$crd_wrapper")
if [[ ! -f $crd_dir/.complete ]]; then
  # module_dir <module path>: its unpacked, checksum-verified directory in the module cache.
  module_dir() {
    local json
    json=$(cd "$repo/$crd_wrapper" && go mod download -json "$1") || die "go mod download $1 failed: $json"
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$json"
  }
  po=$(module_dir github.com/prometheus-operator/prometheus-operator)
  gw=$(module_dir sigs.k8s.io/gateway-api)
  [[ -d $po && -d $gw ]] || die "could not locate the downloaded CRD modules ('$po', '$gw')"
  mkdir -p "$crd_dir"
  for src in \
    "$po/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" \
    "$po/example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml" \
    "$gw/config/crd/standard/gateway.networking.k8s.io_httproutes.yaml"; do
    cp "$src" "$crd_dir/" || die "missing from its module: $src"
  done
  chmod 0644 "$crd_dir"/*.yaml
  touch "$crd_dir/.complete"
  log "copied the ServiceMonitor, PrometheusRule and HTTPRoute CRDs into $crd_dir"
fi

echo "PAYNOTIFY_HELM=$helm_dir/helm"
echo "PAYNOTIFY_PROMTOOL=$prom_dir/promtool"
echo "PAYNOTIFY_TEST_CRDS=$crd_dir"
