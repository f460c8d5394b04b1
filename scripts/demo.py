"""`make demo`: the whole system in a couple of minutes, as a newcomer would drive it.

1. Build a quick MovieLens-100K store into ./store unless one exists.
2. Start the stack (`recsys up`: recall, rank and gateway in one process, no Redis), with the
   demo page on the gateway's HTTP port (its address is printed).
3. Show recommendations for two known users and one unknown user (`recsys recommend`).
4. Report a click (`recsys report-event`) and show how that user's answer changes.
5. From a terminal: keep the stack (and the page) up until Enter. Then stop it (SIGTERM) and
   check nothing is left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECSYS = [sys.executable, "-m", "recsys.cli"]
STORE = Path(os.environ.get("RECSYS_DEMO_STORE", ROOT / "store"))
PORT = int(os.environ.get("RECSYS_DEMO_PORT", "50061"))  # not the default: a running stack may hold it
HTTP_PORT = int(os.environ.get("RECSYS_DEMO_HTTP_PORT", "8061"))  # likewise not 8080
ADDR = f"127.0.0.1:{PORT}"


def say(text: str) -> None:
    print(f"\n\033[1m▶ {text}\033[0m", flush=True)


def recsys(*args: str, capture: bool = False) -> str:
    result = subprocess.run([*RECSYS, *args], cwd=ROOT, text=True, capture_output=capture, check=False)
    if result.returncode != 0:
        if capture:
            sys.stderr.write(result.stderr)
        raise SystemExit(f"demo: `recsys {' '.join(args)}` failed with status {result.returncode}")
    return result.stdout if capture else ""


def main() -> int:
    if not (STORE / "CURRENT").is_file():
        say(f"building a quick MovieLens-100K store in {STORE} (about a minute)")
        recsys("build", "--dataset", "ml-100k", "--profile", "quick", "--store", str(STORE))
    say("starting the stack: recsys up (recall, rank and gateway; in-process feature store)")
    stack = subprocess.Popen(
        [
            *RECSYS,
            "up",
            "--store",
            str(STORE),
            "--gateway-port",
            str(PORT),
            "--recall-port",
            "0",
            "--rank-port",
            "0",
            "--http-port",
            str(HTTP_PORT),
            "--ui",
            "--metrics-port",
            "-1",
            "--event-log",
            str(ROOT / "events.csv"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert stack.stdout is not None
    try:
        started = time.monotonic()
        page = ""
        for line in stack.stdout:
            print(f"  {line.rstrip()}", flush=True)
            if line.startswith("ui "):  # `up` prints the page's address as it bound it
                page = line.split()[-1]
            if line.startswith("SERVING"):
                break
            if time.monotonic() - started > 180:
                raise SystemExit("demo: the stack did not start within 180 s")
        else:
            raise SystemExit(f"demo: the stack exited with status {stack.wait()}")
        # Keep draining the stack's stdout so it never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in stack.stdout or []], daemon=True).start()
        say(f"the demo page: open {page}?user=22 in a browser (pick a user, click items, watch the answer)")

        for user in ("196", "22", "someone-new"):
            say(f"recsys recommend --user {user} --count 8")
            recsys("recommend", "--user", user, "--count", "8", "--addr", ADDR)

        user = "22"
        say(f"user {user} before a click (dry run: nothing recorded)")
        dry_run = ("recommend", "--user", user, "--count", "20", "--dry-run", "--addr", ADDR)
        before = recsys(*dry_run, capture=True)
        print(before, end="")
        clicked = before.splitlines()[2].split()[1]  # the top item's id (row 1 of the table)
        say(f"recsys report-event --user {user} --item {clicked} --type click")
        recsys("report-event", "--user", user, "--item", clicked, "--type", "click", "--addr", ADDR)
        say(f"user {user} after the click")
        after = recsys(*dry_run, capture=True)
        print(after, end="")
        ids_before = {line.split()[1] for line in before.splitlines()[2:]}
        ids_after = {line.split()[1] for line in after.splitlines()[2:]}
        print(
            f"\n  clicked item {clicked} is gone (consumed: {clicked not in ids_after}); "
            f"{len(ids_after - ids_before)} new items entered the top 20: {sorted(ids_after - ids_before)}"
        )
        if sys.stdin.isatty():  # someone is watching: leave the page up until they are done
            say(f"the stack keeps serving {page}?user={user} ; press Enter to stop it")
            with contextlib.suppress(EOFError, KeyboardInterrupt):
                input()
    finally:
        say("stopping the stack (SIGTERM)")
        if stack.poll() is None:
            stack.send_signal(signal.SIGTERM)
        try:
            status = stack.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stack.kill()
            status = stack.wait()
        print(f"  recsys up exited with status {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
