#!/usr/bin/env bash
# Builds the GoPay reference peer and prints the binary's path (its only stdout line).
# The binary is cached under ${XDG_CACHE_HOME:-$HOME/.cache}/paynotify/gopay-peer/<hash>/,
# where <hash> is the first 16 hex digits of SHA-256(go.mod + go.sum + main.go + the Go
# version); a cached
# binary is reused without building.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! command -v go >/dev/null 2>&1; then
    echo "build.sh: 'go' is not on PATH; the GoPay peer needs Go 1.26 or newer" >&2
    exit 1
fi

if command -v sha256sum >/dev/null 2>&1; then
    sha256() { sha256sum; }
elif command -v shasum >/dev/null 2>&1; then
    sha256() { shasum -a 256; }
else
    echo "build.sh: neither sha256sum nor shasum is available" >&2
    exit 1
fi

hash="$({ cat "$here/go.mod" "$here/go.sum" "$here/main.go"; GOTOOLCHAIN=local go version; } | sha256 | cut -c1-16)"
dir="${XDG_CACHE_HOME:-$HOME/.cache}/paynotify/gopay-peer/$hash"
bin="$dir/gopay-peer"

if [[ ! -x "$bin" ]]; then
    mkdir -p "$dir"
    tmp="$(mktemp "$dir/.gopay-peer.XXXXXX")"
    trap 'rm -f "$tmp"' EXIT
    # Build output goes to stderr: stdout carries only the path.
    (
        cd "$here"
        GOTOOLCHAIN=local GOFLAGS=-mod=readonly \
            go build -trimpath -buildvcs=false -o "$tmp" .
    ) >&2
    mv -f "$tmp" "$bin"
    trap - EXIT
    echo "build.sh: built $bin" >&2
fi

printf '%s\n' "$bin"
