#!/usr/bin/env python3
"""Samples the state and current system call of every thread of a process, 100 times a second.

    load-tests/scripts/thread-states.py PID SECONDS [NAME_PART]

Prints, per thread that was not idle at least a tenth of the time (idle: sleeping in futex),
the share of samples in each (state, syscall) pair: R is running or runnable, S sleeping,
D in uninterruptible I/O; 202 is futex, 232 epoll_wait, 74 fsync (x86_64 numbers). This is how
docs/benchmarks.md (thirteenth session) found the SQLite writer waiting between commits.
"""
import collections
import os
import sys
import time


def main() -> None:
    pid, seconds = sys.argv[1], float(sys.argv[2])
    part = sys.argv[3] if len(sys.argv) > 3 else ""
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    names: dict[str, str] = {}
    end = time.time() + seconds
    rounds = 0
    while time.time() < end:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                if part not in name:
                    continue
                state = stat[stat.rindex(")") + 2]
                with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                    call = f.read().split()[0]
            except OSError:
                continue
            names[tid] = name
            seen[tid][(state, call if state != "R" else "-")] += 1
        rounds += 1
        time.sleep(0.01)
    for tid, counts in sorted(seen.items(), key=lambda kv: int(kv[0])):
        total = sum(counts.values())
        if total - counts[("S", "202")] < total / 10:
            continue
        shares = ", ".join(f"{s}/{c} {n * 100 / total:.1f}%" for (s, c), n in counts.most_common(5))
        print(f"{tid} {names[tid]}: {shares}")
    print(f"{rounds} samples per thread")


if __name__ == "__main__":
    main()
