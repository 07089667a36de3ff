#!/usr/bin/env bash
# Alternating world-room fan-out runs of several builds or settings, one line per run
# (docs/benchmarks.md: compare builds only within one series on one machine, runs alternating).
#
#   load-tests/scripts/fanout-ab.sh ROUNDS VARIANT...
#
# VARIANTs as for chat-ab.sh: a directory under BENCH_BINS (default /tmp/gochat-bench/bins)
# holding `gochat` and `gochat-load`, optionally followed by server settings joined with `+`.
# Each run is `fanout --room ROOM --members MEMBERS --rate RATE --duration 20` (ROOM world,
# MEMBERS 10000 and RATE 30 unless set; ROOM=group goes through the task service's member pages)
# on a fresh server (bench-run.sh). Prints deliveries/s, the publish -> recipient
# latencies (p50 p95 p99 max, ms), the server's CPU time and the generator's (user + system).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rounds=$1
shift
bins=${BENCH_BINS:-/tmp/gochat-bench/bins}
members=${MEMBERS:-10000}
rate=${RATE:-30}
room=${ROOM:-world}
for _ in $(seq 1 "$rounds"); do
    for v in "$@"; do
        dir=${v%%+*}
        extra=""
        [[ $v == *+* ]] && extra=${v#*+}
        out=$(EXTRA=${extra//+/ } "$here/bench-run.sh" "$bins/$dir" fanout --room "$room" \
            --members "$members" --rate "$rate" --duration 20 2>&1 || true)
        rate_line=$(grep -E '^deliveries +[0-9]' <<< "$out" | head -1 | tr -s ' ' | cut -d' ' -f2-)
        lat=$(grep -E '^publish -> recipient' <<< "$out" | tr -s ' ' | cut -d' ' -f4-)
        got=$(grep -E '^deliveries received' <<< "$out" | tr -s ' ' | cut -d' ' -f5-)
        cpu=$(awk '/server CPU/ {print $3}' <<< "$out")
        gen=$(awk '/^(user|sys)\t/ {split($2, t, "m"); s += t[1] * 60 + t[2]} END {printf "%.2f", s}' \
            <<< "$out")
        checks=$(grep -E '^seq (gaps|duplicates|reordered)' <<< "$out" | awk '{print $3}' \
            | tr '\n' ' ')
        echo "$(date +%H:%M) $v deliveries/s=${rate_line} received=${got} cpu=${cpu}s generator=${gen}s" \
            "gaps/dups/reord=${checks}recipient: $lat"
    done
done
