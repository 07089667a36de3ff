#!/usr/bin/env bash
# One benchmark run against a fresh embedded server, as docs/benchmarks.md ("The server under
# test") describes: the data directory and the generator's token cache are deleted, the server is
# started with cheap password hashing and long-lived tokens, the scenario runs, and the server's
# CPU time, peak memory and bytes written are printed before it is stopped.
#
#   load-tests/scripts/bench-run.sh BIN_DIR SCENARIO [ARGS...]
#
# BIN_DIR holds the `gochat` and `gochat-load` release binaries (copy each build to a directory
# of its own to compare builds). Extra server settings go in EXTRA, for example
# EXTRA="GOCHAT_LOGIC__ARBITERS=1". The server's /metrics after the run are left in
# $WORK/metrics.txt (WORK defaults to /tmp/gochat-bench).
set -euo pipefail
bin_dir=$1
shift
work=${WORK:-/tmp/gochat-bench}
listen=127.0.0.1:8080
mkdir -p "$work"
pkill -f "serve --listen $listen" 2>/dev/null || true
sleep 1
rm -rf "$work/data" /tmp/gochat-load-users-*
ulimit -n 20000
# shellcheck disable=SC2086 # EXTRA is a list of NAME=VALUE words
env ${EXTRA:-} GOCHAT_REPO__ARGON2_MEMORY_KIB=64 GOCHAT_REPO__ARGON2_ITERATIONS=1 \
    GOCHAT_AUTH__ACCESS_TTL_SECS=86400 GOCHAT_LOG__FILTER=warn \
    "$bin_dir/gochat" serve --listen "$listen" --data-dir "$work/data" > "$work/server.log" 2>&1 &
pid=$!
echo "$pid" > "$work/pid"
for _ in $(seq 1 100); do
    curl -sf "http://$listen/healthz" > /dev/null && break
    sleep 0.1
done
status=0
time "$bin_dir/gochat-load" "$@" --quiet || status=$?
curl -s "http://$listen/metrics" > "$work/metrics.txt" || true
awk '{printf "server CPU %.2f s\n", ($14+$15)/100}' "/proc/$pid/stat"
grep -E "VmRSS|VmHWM" "/proc/$pid/status"
grep write_bytes "/proc/$pid/io"
kill "$pid"
wait "$pid" 2>/dev/null || true
du -sh "$work/data"
exit "$status"
