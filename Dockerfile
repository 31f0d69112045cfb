# syntax=docker/dockerfile:1
# Multi-stage: build with the Rust toolchain, ship only the binary on a distroless,
# non-root base with glibc. Build it tagged with the crate's version (never :latest,
# which Kubernetes would try to pull):
#   docker build -t line-retry-proxy:0.2.0 .
# Add --build-arg SOURCE_URL=<your repository's URL> to fill the source label.

FROM rust:1-bookworm AS build
WORKDIR /src
# The dependencies first, in a layer of their own: built from the manifest, the lock
# file and stand-in crate roots, so a change to src/ rebuilds the crate alone. The
# same cargo command as scripts/build-release.sh, so its build reuses them.
COPY Cargo.toml Cargo.lock ./
# Cargo.toml declares the benchmark targets: without their files the manifest does not parse.
COPY benches ./benches
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin line-retry-proxy \
 && rm -r src
COPY src ./src
COPY scripts/build-release.sh ./scripts/
# COPY keeps the sources' modification times, older than the stand-ins' build: touched,
# the crate roots are newer, and cargo rebuilds the crate instead of shipping the stand-in.
# Built into the work directory (not /out): scripts/replay-dockerfile.py replays this
# stage in a temporary root in CI and follows only paths relative to WORKDIR.
RUN touch src/main.rs src/lib.rs && scripts/build-release.sh dist

FROM gcr.io/distroless/cc-debian12:nonroot
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="line-retry-proxy" \
      org.opencontainers.image.description="A proxy that gives LINE Messaging API bots retry safety: derived X-Line-Retry-Key, internal retries, replay" \
      org.opencontainers.image.version="0.2.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}"
COPY --from=build /src/dist/line-retry-proxy /usr/local/bin/line-retry-proxy
COPY --from=build --chown=65532:65532 /src/dist/data /var/lib/line-retry-proxy
# The intercept CA lives here: mount a volume to keep it across restarts and to
# share ca.pem with the bot container.
ENV LINE_RETRY_PROXY_CA_DIR=/var/lib/line-retry-proxy/ca
VOLUME ["/var/lib/line-retry-proxy/ca"]
# The proxy listens on 127.0.0.1 unless told otherwise: set
# LINE_RETRY_PROXY_LISTEN=0.0.0.0:8080 (and ..._ADMIN_LISTEN) explicitly to serve
# other containers. A sidecar sharing the bot's network namespace needs neither.
EXPOSE 8080 9090
USER 65532:65532
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/line-retry-proxy", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/line-retry-proxy"]
CMD ["serve"]
