# syntax=docker/dockerfile:1
# Multi-stage: build with the Rust toolchain, ship only the binary on a distroless,
# non-root base with glibc. Build: docker build -t line-retry-proxy .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml declares the benchmark target: without its file the manifest does not parse.
COPY benches ./benches
COPY scripts/build-release.sh ./scripts/
# Built into the work directory (not /out): scripts/replay-dockerfile.py replays this
# stage in a temporary root in CI and follows only paths relative to WORKDIR.
RUN scripts/build-release.sh dist

FROM gcr.io/distroless/cc-debian12:nonroot
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
