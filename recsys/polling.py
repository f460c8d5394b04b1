"""A background poll loop for the services' live views of the feature store (the catalogue, the
look-alike vectors): one place for how a poll is scheduled, how a failure is survived (the last
view stays served, the failure is counted and logged) and how the loop stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging


class Poller:
    """Calls `poll()` every `poll_seconds` in a task of its own between `start()` and `stop()`.
    A poll that raises (a feature store that is down) leaves whatever the last good poll built;
    `failures` counts such polls, `polled(succeeded)` is told of each one."""

    def __init__(self, poll_seconds: float, *, name: str, log: logging.Logger, what: str) -> None:
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds: expected > 0, got {poll_seconds}")
        self.poll_seconds = poll_seconds
        self.polls = 0
        self.failures = 0
        self._name = name
        self._log = log
        self._what = what  # for the log line of a failed poll
        self._task: asyncio.Task[None] | None = None

    async def poll(self) -> bool:
        """One poll: True when what it serves changed."""
        raise NotImplementedError

    def polled(self, succeeded: bool) -> None:
        """After each scheduled poll (the service's metrics, say)."""

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            try:
                await self.poll()
                succeeded = True
            except Exception as error:  # keep serving the last good view
                self.failures += 1
                succeeded = False
                self._log.warning("%s failed: %s", self._what, error)
            self.polled(succeeded)
            await asyncio.sleep(self.poll_seconds)
