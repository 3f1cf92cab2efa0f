# syntax=docker/dockerfile:1
# chatbox container image.
#
#   docker build -t chatbox:0.1.0 .
#   docker run --rm -p 8080:8080 --read-only --tmpfs /tmp \
#     -v chatbox-data:/var/lib/chatbox \
#     -e CHATBOX_JWT_SECRET=... -e CHATBOX_ENCRYPTION_KEY=... chatbox:0.1.0
#
# Three stages: the dependencies alone (a layer that changes only with Cargo.lock),
# the server built on top of them, and a distroless runtime that holds the binary,
# a static busybox for the health check, and nothing else. No secret and no config
# file is ever copied in: secrets come from the environment at run time
# (docs/OPERATIONS.md). Runtime limits (open files, io_uring's locked memory) are
# set by whoever runs the container, not here: see docs/OPERATIONS.md, "Limits".

# Base images are pinned by tag here; pin them by digest as well in your registry
# mirror (`FROM rust:1.95-bookworm@sha256:...`) for reproducible builds.

# --- 1. dependency cache --------------------------------------------------------
FROM rust:1.95-bookworm AS deps
WORKDIR /src
# Only the manifests: this layer and the build below are reused until Cargo.toml or
# Cargo.lock change. Every workspace member must be here or cargo refuses the
# workspace (.ci/deploy-checks.sh checks the list against Cargo.toml).
COPY Cargo.toml Cargo.lock ./
COPY loadtest/Cargo.toml loadtest/Cargo.toml
COPY bench/baseline/Cargo.toml bench/baseline/Cargo.toml
COPY fuzz/Cargo.toml fuzz/Cargo.toml
# Stub sources so that cargo can build every dependency of the server; the stub
# crate's own artefacts are deleted so that the real sources are always rebuilt.
# Debug info is dropped (the release profile keeps it for perf work); symbols stay,
# so a panic's backtrace still names functions.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN mkdir -p src loadtest/src bench/baseline/src fuzz/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > bench/hot_path.rs \
 && for d in loadtest bench/baseline fuzz; do echo 'fn main() {}' > "$d/src/main.rs"; done \
 && cargo build --release --locked -p chatbox --bin chatbox \
 && rm -rf src target/release/chatbox target/release/.fingerprint/chatbox-* \
       target/release/deps/chatbox-* target/release/deps/libchatbox-*

# --- 2. build -------------------------------------------------------------------
FROM deps AS build
COPY src src
# COPY keeps the files' own times, which may be older than the stub's artefacts.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked -p chatbox --bin chatbox \
 && install -D -m 0755 target/release/chatbox /out/usr/local/bin/chatbox \
 && install -d -m 0700 /out/var/lib/chatbox

FROM busybox:1.37-musl AS busybox

# --- 3. runtime -----------------------------------------------------------------
# distroless/cc: glibc, libgcc_s and CA certificates, no shell, no package manager;
# the :nonroot variant's user is 65532, which the manifests and the CI simulation
# (.ci/deploy-checks.sh, bwrap --uid 65532) use too.
FROM gcr.io/distroless/cc-debian12:nonroot
# A static busybox, called only as `busybox wget` by HEALTHCHECK: chatbox has no
# health-check subcommand and the runtime image has no curl (Kubernetes ignores
# HEALTHCHECK and uses its own httpGet probes; this one serves docker and compose).
COPY --from=busybox /bin/busybox /usr/local/bin/busybox
COPY --from=build /out/usr/local/bin/chatbox /usr/local/bin/chatbox
# The data directory (embedded SQLite store, dev secrets): the only writable path
# besides /tmp when the root filesystem is read-only (mount a volume on it).
COPY --from=build --chown=65532:65532 /out/var/lib/chatbox /var/lib/chatbox
USER 65532:65532
# All interfaces inside the container (the server's own default is loopback only);
# JSON logs for collectors. Nothing secret here: see docs/OPERATIONS.md.
ENV CHATBOX_LISTEN=0.0.0.0:8080 \
    CHATBOX_DATA_DIR=/var/lib/chatbox \
    CHATBOX_LOG_FORMAT=json
VOLUME ["/var/lib/chatbox"]
EXPOSE 8080
# Liveness only (/healthz stays 200 while draining); it assumes the default port
# and path prefix: change both here if you change CHATBOX_LISTEN or
# CHATBOX_PATH_PREFIX.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["/usr/local/bin/busybox", "wget", "-q", "-T", "2", "-O", "/dev/null", "http://127.0.0.1:8080/chatbox/healthz"]
# SIGTERM starts the graceful drain (shutdown_timeout_secs, 20 s by default):
# give `docker stop` more than that (`docker stop -t 30`, compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/chatbox"]
