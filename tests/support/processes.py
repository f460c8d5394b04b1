"""Run a server as a real process and learn its ports from its JSON log lines."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """A server process started with `--log-format json`; its stderr is collected."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, *args, "--log-format", "json"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = {"msg": line.rstrip(), "raw": True}
            self.lines.append(entry)
            self._queue.put(entry)

    def wait_for(self, message: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until `count` log lines with msg == message were seen; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [entry for entry in self.lines if entry.get("msg") == message]
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                raise AssertionError(f"no {count}× {message!r} in the log:\n{self.log_text()}")
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=min(remaining, 0.2))

    def log_text(self) -> str:
        return "\n".join(json.dumps(entry) for entry in self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()
