"""Settings: defaults that work locally, environment with a service prefix, flags on top,
and errors that name the flag or the variable."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from services.common.cli import SettingsError, add_server_arguments, settings_from_args
from tests.support.scripted_service import ScriptedSettings


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_need_no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "WORKERS", "HOST"):
        monkeypatch.delenv(f"RECSYS_SCRIPTED_{name}", raising=False)
    settings = settings_from_args(ScriptedSettings, parse())
    assert settings.host == "127.0.0.1"
    assert settings.workers == 1
    assert not settings.tls_enabled


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_SCRIPTED_PORT", "6000")
    monkeypatch.setenv("RECSYS_SCRIPTED_MAX_IN_FLIGHT", "7")
    settings = settings_from_args(ScriptedSettings, parse("--port", "6001"))
    assert settings.port == 6001
    assert settings.max_in_flight == 7
    with pytest.raises(Exception, match="frozen"):
        settings.port = 1  # type: ignore[misc]


def test_a_bad_flag_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match=r"^--port: Input should be less than or equal to 65535"):
        settings_from_args(ScriptedSettings, parse("--port", "70000"))
    with pytest.raises(SettingsError, match=r"^--workers: Input should be greater than or equal to 1"):
        settings_from_args(ScriptedSettings, parse("--workers", "0"))


def test_a_bad_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_SCRIPTED_GRACE_SECONDS", "-1")
    with pytest.raises(SettingsError, match=r"^RECSYS_SCRIPTED_GRACE_SECONDS: "):
        settings_from_args(ScriptedSettings, parse())


def test_tls_files_must_come_in_pairs_and_exist(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(SettingsError, match="tls_cert_file and tls_key_file must be set together"):
        settings_from_args(ScriptedSettings, parse("--tls-cert", str(cert)))
    with pytest.raises(SettingsError, match="is not a readable file"):
        settings_from_args(
            ScriptedSettings, parse("--tls-cert", str(cert), "--tls-key", str(tmp_path / "no"))
        )


def test_a_server_waits_for_load_balancers_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test session sets the delay to 0 for speed (tests/conftest.py); without it, a
    # service run any way at all keeps serving 5 s after reporting NOT_SERVING, as in the manifests.
    monkeypatch.delenv("RECSYS_SCRIPTED_SHUTDOWN_DELAY_SECONDS")
    assert settings_from_args(ScriptedSettings, parse()).shutdown_delay_seconds == 5.0
    given = settings_from_args(ScriptedSettings, parse("--shutdown-delay-seconds", "0.5"))
    assert given.shutdown_delay_seconds == 0.5


def test_minus_one_switches_an_optional_port_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_SCRIPTED_METRICS_PORT", "9555")
    assert settings_from_args(ScriptedSettings, parse()).metrics_port == 9555
    assert settings_from_args(ScriptedSettings, parse("--metrics-port", "-1")).metrics_port is None
    with pytest.raises(SettingsError, match="--metrics-port"):
        settings_from_args(ScriptedSettings, parse("--metrics-port", "-2"))
