"""Waiting for real servers started in a test."""

from __future__ import annotations

import asyncio

from services.common.server import GrpcHost


async def wait_until_serving(*hosts: GrpcHost, seconds: float = 60.0) -> None:
    """Until every host's health is SERVING (a model version loaded), at most `seconds`."""
    async with asyncio.timeout(seconds):
        while not all(host.readiness.serving for host in hosts):
            await asyncio.sleep(0.05)
