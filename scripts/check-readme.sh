#!/usr/bin/env bash
# Runs the README's commands as written (those that need no container engine and no
# real LINE), so a README that drifts from the binary fails CI. Listeners are moved
# to port 0 through the environment, which every command reads; nothing leaves
# loopback: no request is sent to the upstream.
set -euo pipefail
cd "$(dirname "$0")/.."

shown() {
  grep -qF -- "$1" README.md || { echo "check-readme: README no longer shows: $1" >&2; exit 1; }
}

work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

# Compile first: the bounded wait below is for the proxy's start, not for the compiler.
cargo build --release --locked --bin line-retry-proxy
run='cargo run --release -- --config config/line-retry-proxy.toml'
shown "$run"
LINE_RETRY_PROXY_LISTEN=127.0.0.1:0 LINE_RETRY_PROXY_ADMIN_LISTEN=127.0.0.1:0 \
LINE_RETRY_PROXY_LOG_FORMAT=json LINE_RETRY_PROXY_CA_DIR="$work/ca" \
  $run 2>"$work/log" &
pid=$!
for _ in $(seq 1 600); do
  grep -q 'line-retry-proxy ready' "$work/log" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/log"; echo "check-readme: the proxy did not start" >&2; exit 1; }
  sleep 0.2
done
ready=$(grep 'line-retry-proxy ready' "$work/log")
admin=$(sed -E 's/.*"admin":"([^"]+)".*/\1/' <<<"$ready")
echo "check-readme: proxy running, admin on $admin"

shown 'cargo run --release -- stats'
LINE_RETRY_PROXY_ADMIN_LISTEN="$admin" cargo run -q --release -- stats | grep '^keys injected' >/dev/null

shown 'curl -s 127.0.0.1:9090/metrics | grep keys_injected'
curl -s "$admin/metrics" | grep keys_injected >/dev/null

bin=target/release/line-retry-proxy
shown 'line-retry-proxy ca --ca-dir ./ca > line-retry-proxy-ca.pem'
(cd "$work" && "$OLDPWD/$bin" ca --ca-dir ./ca > line-retry-proxy-ca.pem && grep -q 'BEGIN CERTIFICATE' line-retry-proxy-ca.pem)
cmp -s "$work/ca/ca.pem" "$work/line-retry-proxy-ca.pem" || { echo "check-readme: ca printed another CA than the running proxy's" >&2; exit 1; }

shown 'line-retry-proxy ca --ca-dir ./ca --bundle > bundle.pem'
(cd "$work" && "$OLDPWD/$bin" ca --ca-dir ./ca --bundle > bundle.pem)
# The system roots and the running proxy's CA, whole.
[ "$(grep -c 'BEGIN CERTIFICATE' "$work/bundle.pem")" -gt 1 ] || { echo "check-readme: ca --bundle printed no system roots" >&2; exit 1; }
[[ "$(tr -d '\r\n' < "$work/bundle.pem")" == *"$(tr -d '\r\n' < "$work/ca/ca.pem")"* ]] || { echo "check-readme: ca --bundle lacks the proxy's CA" >&2; exit 1; }

shown 'cargo install --path . --locked'
shown 'line-retry-proxy ca --renew --ca-dir ./ca > bundle.pem'
(cd "$work" && "$OLDPWD/$bin" ca --renew --ca-dir ./ca > bundle.pem 2>/dev/null)
[ "$(grep -c 'BEGIN CERTIFICATE' "$work/bundle.pem")" -eq 2 ] || { echo "check-readme: ca --renew did not print the new and the old certificate" >&2; exit 1; }
cmp -s "$work/ca/ca-previous.pem" "$work/line-retry-proxy-ca.pem" || { echo "check-readme: ca --renew did not keep the old certificate" >&2; exit 1; }

shown 'line-retry-proxy check-config --config config/line-retry-proxy.toml'
"$bin" check-config --config config/line-retry-proxy.toml | grep '^max-attempts = 4' >/dev/null

shown 'kill -HUP <pid>'
kill -HUP "$pid"
for _ in $(seq 1 100); do grep -q 'configuration reloaded' "$work/log" && break; sleep 0.1; done
grep -q 'configuration reloaded' "$work/log"

kill -TERM "$pid"
wait "$pid" && code=0 || code=$?
[ "$code" -eq 0 ] || { echo "check-readme: exit $code after SIGTERM" >&2; exit 1; }
echo "check-readme: ok (run, stats, metrics, ca, ca --bundle, ca --renew, check-config, SIGHUP, SIGTERM)"
