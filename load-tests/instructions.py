#!/usr/bin/env python3
"""Instructions per lead, by thread and by crate, from callgrind's per-thread dumps.

    load-tests/instructions.py <leads> <dump>-01 <dump>-02 ...

Reads files written by `valgrind --tool=callgrind --separate-threads=yes` (the dump of
`callgrind_control -d`, so only what ran between `-z` and `-d` counts), puts each thread in a
class by the functions it ran (HTTP workers, the store's writer and applier), and prints the
instructions per lead of each class and, for the HTTP workers, the crates they were spent in:
each instruction counts for the source file it comes from, so code inlined from a library
counts for that library.
"""
import collections
import re
import sys

CLASSES = [
    ("HTTP workers", "actix_server::worker"),
    ("store writer", "embedded::Writer"),
    ("store applier", "applier_loop"),
]

CRATE = re.compile(r"/index\.crates\.io-[^/]+/([A-Za-z0-9_\-]+?)-\d+\.\d+[^/]*/")


def crate_of(path):
    found = CRATE.search(path)
    if found:
        return found.group(1)
    if "/rustc/" in path or "/rust/deps/" in path:
        return "std"
    if "/sysdeps/" in path or "libc" in path:
        return "libc"
    if "/src/" in path or "load-tests/" in path:
        return "own code"
    return "other"


def read(path):
    """Self cost (instructions) per source file, the thread's total, and its function names."""
    names = {"fl": {}, "fn": {}}
    by_file = collections.Counter()
    functions = set()
    total = 0
    fl = fi = None
    after_calls = False
    with open(path, errors="replace") as dump:
        for line in dump:
            line = line.rstrip("\n")
            if not line:
                continue
            head = line[0]
            if head.isdigit() or head in "+-*":
                if after_calls:
                    after_calls = False
                    continue
                fields = line.split()
                if len(fields) > 1:
                    cost = int(fields[1])
                    by_file[fi if fi is not None else fl] += cost
                continue
            key, _, value = line.partition("=")
            if key == "calls":
                after_calls = True
                continue
            if key in ("fl", "fi", "fe", "fn", "cfl", "cfi", "cfn"):
                kind = "fn" if key in ("fn", "cfn") else "fl"
                match = re.match(r"\((\d+)\)(?: (.*))?", value)
                if match:
                    ident, name = match.group(1), match.group(2)
                    if name is not None:
                        names[kind][ident] = name
                    name = names[kind].get(ident, ident)
                else:
                    name = value
                if key == "fl":
                    fl, fi = name, None
                elif key in ("fi", "fe"):
                    fi = name
                elif key == "fn":
                    fi = None
                    functions.add(name)
                elif key == "cfn":
                    functions.add(name)
            elif line.startswith("summary:") or line.startswith("totals:"):
                total = max(total, int(line.split()[1]))
    return by_file, total, functions


def main():
    leads = int(sys.argv[1])
    classes = collections.Counter()
    crates = collections.Counter()
    for path in sys.argv[2:]:
        by_file, total, functions = read(path)
        if total == 0:
            continue
        joined = "\n".join(functions)
        kind = next((name for name, mark in CLASSES if mark in joined), "other")
        classes[kind] += total
        if kind == "HTTP workers":
            for file, cost in by_file.items():
                crates[crate_of(file or "")] += cost
    print(f"instructions per lead ({leads} leads)")
    for name, _ in CLASSES + [("other", "")]:
        if classes[name]:
            print(f"  {name:<14} {classes[name] / leads:>10,.0f}")
    print(f"  {'all':<14} {sum(classes.values()) / leads:>10,.0f}")
    print("HTTP workers by crate")
    for crate, cost in crates.most_common(14):
        print(f"  {crate:<24} {cost / leads:>10,.0f}")


if __name__ == "__main__":
    main()
