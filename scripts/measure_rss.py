"""Resident memory of each service process on a model store, for the pod sizing table in
docs/operations.md:

    .venv/bin/python scripts/measure_rss.py --store ./store [--services recall rank gateway]

Starts each service alone (`recsys serve …`, embedded feature store, free ports), waits until
it logs that it serves the store's current version, lets it settle, and prints its resident
set (VmRSS) and peak (VmHWM) from /proc. Linux only."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVING = "serving model version"
SETTLE_SECONDS = 3.0


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def measure(service: str, store: str, timeout: float) -> dict[str, int]:
    recsys = str(Path(sys.executable).with_name("recsys"))
    command = [recsys, "serve", service, "--store", store, "--port", "0", "--metrics-port", "0"]
    if service == "gateway":  # no recall or rank needed to load a version and hold it
        command += ["--http-port", "0", "--recall-addr", "127.0.0.1:9", "--rank-addr", "127.0.0.1:9"]
    with tempfile.TemporaryDirectory() as work, open(Path(work) / "log", "w+b") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, cwd=work)
        try:
            deadline = time.monotonic() + timeout
            while SERVING.encode() not in Path(log.name).read_bytes():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{service} did not load: {Path(log.name).read_text()[-2000:]}")
                time.sleep(0.2)
            time.sleep(SETTLE_SECONDS)
            return memory_kib(process.pid)
        finally:
            process.terminate()
            process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--store", required=True)
    parser.add_argument("--services", nargs="+", default=["recall", "rank", "gateway"])
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    store = os.path.abspath(args.store)
    print(f"{'service':10} {'RSS MiB':>8} {'peak MiB':>9}")
    for service in args.services:
        memory = measure(service, store, args.timeout)
        print(f"{service:10} {memory['VmRSS'] / 1024:8.0f} {memory['VmHWM'] / 1024:9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
