#!/usr/bin/env bash
# ferrymq vs Mosquitto vs rumqttd, side by side, in one run. See docs/benchmarks.md.
#
#   e2e/bench/compare.sh                      # full suite: ROUNDS=3, DURATION=5 s per run
#   ROUNDS=1 DURATION=2 e2e/bench/compare.sh --scenarios p2p-qos1-64b --conns 0
#
# Extra arguments go to `ferrymq-bench compare` (see `ferrymq-bench compare --help`).
# Writes the generated section of docs/benchmarks.md and target/bench/compare.json.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}

# Mosquitto from the Debian package. apt may start it as a service on 1883: stop that one,
# the benchmark starts its own instances on free loopback ports.
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto
    (systemctl stop mosquitto || service mosquitto stop) >/dev/null 2>&1 || true
fi
# rumqttd from crates.io, without --locked: its shipped lock file pins a metrics crate that no
# longer builds on current Rust.
if ! command -v rumqttd >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/rumqttd" ]; then
    cargo install rumqttd
fi

cargo build --release -p ferrymq-broker -p ferrymq-e2e

# The connection-scale test needs one descriptor per connection in the broker and in the load
# generator (the brokers inherit this limit). Raise the soft limit as far as the hard one allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
ulimit -n 1100000 2>/dev/null || true

mkdir -p target/bench
export FERRYMQ_BENCH_COMMAND="ROUNDS=$ROUNDS DURATION=$DURATION e2e/bench/compare.sh $*"
exec target/release/ferrymq-bench compare \
    --ferrymq-bin target/release/ferrymq \
    --rounds "$ROUNDS" --duration "$DURATION" \
    --out docs/benchmarks.md --json target/bench/compare.json "$@"
