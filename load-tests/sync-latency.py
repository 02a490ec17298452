#!/usr/bin/env python3
"""How long one durable append takes on this disk, with nothing else running in the process.

    load-tests/sync-latency.py [DIR] [COUNT]

Writes COUNT (default 2,000) records 1 ms apart into a zero-filled 8 MiB file in DIR (default
the current folder), two ways, and prints p50/p90/p99/max of each and the CPU time (user +
system) this process spent per write:

- `pwrite` of 700 bytes (about one lead's record) then `fdatasync`, as leadex's write-ahead
  log did until it wrote with direct I/O, and as it still does on a filesystem without it;
- one `pwrite` of 4 KiB on a file opened `O_DIRECT | O_DSYNC`, the same durability in one
  syscall and without the page cache, as leadex's log and `fanout-baseline --sync-dir` write.

That is the floor under any answer given only once the lead is stored. The file is removed at
the end.
"""
import mmap
import os
import resource
import sys
import time

SIZE = 8 << 20


def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summary(name, lat, cpu_seconds):
    lat.sort()
    n = len(lat)
    pick = lambda q: lat[min(n - 1, int(q * n))] * 1e3
    print(f"{name:<28} p50 {pick(0.5):.3f}  p90 {pick(0.9):.3f}  p99 {pick(0.99):.3f}  "
          f"max {lat[-1] * 1e3:.3f} ms  CPU {cpu_seconds / n * 1e6:.0f} us a write  ({n} writes)")


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "."
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    path = os.path.join(folder, f"sync-latency-{os.getpid()}.tmp")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"\0" * SIZE)
        os.fsync(fd)
        record = b"x" * 700
        lat = []
        started_cpu = cpu()
        for i in range(count):
            started = time.perf_counter()
            os.pwrite(fd, record, (i * len(record)) % (SIZE - len(record)))
            os.fdatasync(fd)
            lat.append(time.perf_counter() - started)
            time.sleep(0.001)
        summary("pwrite 700 B + fdatasync", lat, cpu() - started_cpu)
        os.close(fd)
        fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
        block = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
        block.write(b"y" * 4096)
        lat = []
        started_cpu = cpu()
        for i in range(count):
            started = time.perf_counter()
            os.pwritev(fd, [block], (i * 4096) % SIZE)
            lat.append(time.perf_counter() - started)
            time.sleep(0.001)
        summary("O_DIRECT|O_DSYNC 4 KiB", lat, cpu() - started_cpu)
    finally:
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main()
