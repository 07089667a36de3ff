#!/usr/bin/env bash
# Alternating chat runs of several builds or settings, one line per run (docs/benchmarks.md:
# compare builds only within one series on one machine, runs alternating).
#
#   load-tests/scripts/chat-ab.sh ROUNDS RATE VARIANT...
#
# A VARIANT is a directory holding `gochat` and `gochat-load` (relative to BENCH_BINS, default
# /tmp/gochat-bench/bins), optionally followed by server settings joined with `+`:
# `before after after+GOCHAT_LOGIC__ARBITERS=1`. Each run is
# `chat --users 2000 --rate RATE --duration 30` on a fresh server (bench-run.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rounds=$1
rate=$2
shift 2
bins=${BENCH_BINS:-/tmp/gochat-bench/bins}
work=${WORK:-/tmp/gochat-bench}
for _ in $(seq 1 "$rounds"); do
    for v in "$@"; do
        dir=${v%%+*}
        extra=""
        [[ $v == *+* ]] && extra=${v#*+}
        out=$(EXTRA=${extra//+/ } "$here/bench-run.sh" "$bins/$dir" chat --users 2000 \
            --rate "$rate" --duration 30 2>&1 || true)
        stored=$(awk '/^stored/ {print $3}' <<< "$out")
        e2e=$(grep -E '^e2e' <<< "$out" | tr -s ' ' | cut -d' ' -f4-13)
        cpu=$(awk '/server CPU/ {print $3}' <<< "$out")
        drained=$(awk '/^drained/ {print $2}' <<< "$out")
        gen=$(awk '/^(user|sys)\t/ {split($2, t, "m"); s += t[1] * 60 + t[2]} END {printf "%.2f", s}' \
            <<< "$out")
        checks=$(grep -E '^seq (gaps|duplicates)' <<< "$out" | awk '{print $3}' | tr '\n' ' ')
        echo "$(date +%H:%M) $v rate=$rate stored=$stored cpu=${cpu}s generator=${gen}s drained=$drained" \
            "gaps/dups=${checks}e2e: $e2e"
        grep -h 'op="sqlite_commit_wait"' "$work/metrics.txt" | grep -E '_(sum|count)' | tr '\n' ' '
        echo
    done
done
