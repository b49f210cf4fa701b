# syntax=docker/dockerfile:1
# The paynotify image: the one `paynotify` binary (all roles: controller, ingress, serve,
# verify, events, replay) on a distroless base without a shell, run as a non-root user.
#
#   docker build -t paynotify:0.1.0 .
#
# The Helm chart (charts/paynotify) runs it with `args` only (`controller …`, `ingress …`),
# so the ENTRYPOINT is the binary, and as UID/GID 65532 (podSecurityContext.runAsUser and
# runAsGroup), the distroless `nonroot` user. tests/chart.rs checks these facts against the
# chart and Cargo.toml; the test command cannot build the image (no Docker engine on CI).

# ---- build: the Rust toolchain the tests use (Rust 1.95), Debian 12 like the final image
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The workspace: the package, its benchmark target and the bench member (Cargo reads every
# member's manifest and targets even when building one binary). .dockerignore keeps out the rest.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY bench/Cargo.toml ./bench/Cargo.toml
COPY bench/src ./bench/src
# --locked: exactly the dependency versions of Cargo.lock, as CI builds them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin paynotify \
    && install -D -m 0555 target/release/paynotify /out/paynotify

# ---- run: glibc and CA certificates, no shell, no package manager
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/paynotify /paynotify
# The distroless `nonroot` user, numerically, so that runAsNonRoot can verify it.
USER 65532:65532
# The callback listener and the admin listener (/healthz, /readyz, /metrics) by default.
EXPOSE 8080 9090
ENTRYPOINT ["/paynotify"]
