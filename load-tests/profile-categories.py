#!/usr/bin/env python3
"""CPU per lead by category, from a call-graph profile of one process.

    perf record -F 499 --call-graph dwarf,32768 -p <pid> -- sleep 4
    perf script -F comm,tid,ip,sym | load-tests/profile-categories.py <CPU µs per lead>

Each sample counts once, for the frame nearest its leaf that matches a category below (a
kernel frame matches none, so a syscall counts for the program code that made it). Shares of
all samples become µs per lead with the process's CPU per lead from `run.sh`.
"""
import collections
import re
import sys

CATEGORIES = [
    ("tracing", r"tracing_subscriber::|tracing_core::|tracing::span::|nu_ansi_term|sharded_slab"),
    ("metrics", r"metrics::|metrics_util::|metrics_exporter_prometheus::"),
    ("redb", r"redb::"),
    ("write-ahead log", r"storage::wal::"),
    ("leadex storage", r"leadex::storage::"),
    ("serde_json", r"serde_json::|serde_core::|serde::"),
    ("reqwest", r"reqwest::"),
    ("hyper client", r"hyper_util::|hyper::"),
    ("http/url/h2", r"\bhttp::|url::|idna::|h2::"),
    ("actix-http/web", r"actix_http::|actix_web::|actix_router::|actix_server::|actix_service::|actix_codec::"),
    ("actix actors", r"\bactix::"),
    ("syscalls and scheduling (tokio)", r"tokio::"),
    ("futures", r"futures_util::|futures_core::|futures_channel::"),
    ("leadex other", r"leadex::|fanout_baseline::"),
    ("allocation (mimalloc)", r"\bmi_|_mi_"),
    ("memcpy/memset", r"__mem(move|cpy|set|cmp)"),
    ("bytes", r"bytes::"),
    ("hashing and maps", r"hashbrown::|indexmap::|core::hash|std::hash|sha2::"),
]
PATTERNS = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]


def category(frames):
    for frame in frames:
        for name, pattern in PATTERNS:
            if pattern.search(frame):
                return name
    return "other"


def main():
    us_per_lead = float(sys.argv[1])
    by_thread = collections.defaultdict(collections.Counter)
    thread, frames = None, []
    for line in list(sys.stdin) + [""]:
        if line.strip() and line[0] in " \t":
            parts = line.split(None, 1)
            frames.append(parts[1] if len(parts) > 1 else "")
            continue
        if thread is not None:
            by_thread[thread][category(frames)] += 1
        thread, frames = (line.split()[0], []) if line.strip() else (None, [])
    total = sum(sum(c.values()) for c in by_thread.values())
    for name, counts in sorted(by_thread.items(), key=lambda t: -sum(t[1].values())):
        share = sum(counts.values()) / total
        print(f"{name}: {100 * share:.1f} % ({us_per_lead * share:.1f} µs per lead)")
        for what, n in counts.most_common():
            print(f"  {us_per_lead * n / total:7.1f}  {what}")


if __name__ == "__main__":
    main()
