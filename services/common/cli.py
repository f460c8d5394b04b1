"""The flags every `recsys serve <service>` command shares, and how they become settings.

Precedence: flag > environment variable (`RECSYS_<SERVICE>_<SETTING>`) > default. A bad
value is reported naming the flag (or the variable), never with a traceback.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from services.common.settings import ServerSettings

SettingsT = TypeVar("SettingsT", bound=ServerSettings)

# setting name → flag; every flag defaults to None, meaning "not given: use env or default".
SERVER_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "host": ("--host", {"help": "address to bind (default 127.0.0.1; 0.0.0.0 in containers)"}),
    "port": ("--port", {"type": int, "help": "gRPC port (0 picks a free one)"}),
    "metrics_port": (
        "--metrics-port",
        {"type": int, "help": "Prometheus /metrics port (0 picks one, -1: none)"},
    ),
    "workers": ("--workers", {"type": int, "help": "processes serving the one port (default 1)"}),
    "max_in_flight": (
        "--max-in-flight",
        {"type": int, "help": "the most calls in flight per process the adaptive limit allows"},
    ),
    "latency_target_ms": (
        "--latency-target-ms",
        {"type": float, "help": "admission: p90 latency above which the concurrency limit falls"},
    ),
    "max_queue_ms": (
        "--max-queue-ms",
        {"type": float, "help": "admission: longest expected wait for a slot before shedding (0: none)"},
    ),
    "grace_seconds": ("--grace-seconds", {"type": float, "help": "time in-flight calls get on shutdown"}),
    "shutdown_delay_seconds": (
        "--shutdown-delay-seconds",
        {"type": float, "help": "NOT_SERVING this long before refusing calls on shutdown (default 5)"},
    ),
    "tracing": (
        "--tracing",
        {
            "action": "store_const",
            "const": True,
            "help": "OpenTelemetry tracing (exporter from the OTEL_* variables; default off)",
        },
    ),
    "log_format": ("--log-format", {"choices": ("text", "json"), "help": "log format on stderr"}),
    "log_level": ("--log-level", {"choices": ("debug", "info", "warning", "error")}),
    "tls_cert_file": ("--tls-cert", {"type": Path, "help": "server certificate (PEM); enables TLS"}),
    "tls_key_file": ("--tls-key", {"type": Path, "help": "server private key (PEM)"}),
    "tls_client_ca_file": ("--tls-client-ca", {"type": Path, "help": "CA for client certificates (mTLS)"}),
}


# Ports a flag may switch off with -1 (their settings are `int | None`, None meaning none).
OPTIONAL_PORTS = ("metrics_port", "http_port")


class SettingsError(ValueError):
    """A setting has a bad value; the message names the flag or environment variable."""


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    for dest, (flag, options) in SERVER_FLAGS.items():
        group.add_argument(flag, dest=dest, default=None, **options)


def settings_from_args(settings_type: type[SettingsT], args: argparse.Namespace) -> SettingsT:
    """Read the settings once: flags given on the command line override the environment."""
    overrides = {
        name: getattr(args, name)
        for name in settings_type.model_fields
        if getattr(args, name, None) is not None
    }
    for name in OPTIONAL_PORTS:  # -1 switches the port off (unset in the settings)
        if overrides.get(name) == -1:
            overrides[name] = None
    try:
        return settings_type(**overrides)
    except ValidationError as error:
        prefix = str(settings_type.model_config.get("env_prefix", ""))
        problems = []
        for item in error.errors():
            name = str(item["loc"][0]) if item["loc"] else ""
            if name in overrides and name in SERVER_FLAGS:
                where = SERVER_FLAGS[name][0]
            elif name:
                where = f"{prefix}{name.upper()}"
            else:
                where = "settings"
            problems.append(f"{where}: {item['msg']}")
        raise SettingsError("; ".join(problems)) from None
