"""`recsys store …` run as a user runs it: in a subprocess, against a store written by VersionWriter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from recsys.store import CURRENT_FILE, ModelStore, VersionWriter

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def run_cli(
    *args: str, cwd: Path | None = None, environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "RECSYS_STORE"}
    env.update(environment or {})
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("usage:")]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], result.stderr


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def versions(store_path: Path) -> list[str]:
    """Three versions an hour apart; the newest is current."""
    names = []
    for hour in range(3):
        with VersionWriter(store_path, now=T0 + timedelta(hours=hour)) as version:
            version.save_array("itemcf/neighbors.npy", np.arange(100 * (hour + 1), dtype=np.int64))
            version.save_bytes("ranker/ranker.onnx", b"onnx" * 300)
            version.manifest_fields(
                capabilities={"channels": ["itemcf", "swing"], "rating": True},
                metrics={"recall@50": 0.25 + hour / 100, "ranker": {"auc": 0.7}},
                data_source={"dataset": "movielens-100k"},
            )
            version.publish()
        names.append(version.version)
    return names


def test_help_lists_the_store_commands() -> None:
    assert "store" in run_cli("--help").stdout
    result = run_cli("store", "--help")
    assert result.returncode == 0
    for name in ("list", "show", "rollback", "verify", "prune"):
        assert name in result.stdout


def test_list_table(store_path: Path, versions: list[str]) -> None:
    result = run_cli("store", "list", "--store", str(store_path))
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["VERSION", "CREATED", "SIZE", "METRICS"]
    assert [version in row for version, row in zip(versions, rows, strict=True)] == [True] * 3
    assert [row.startswith("*") for row in rows] == [False, False, True]
    assert "2024-05-01 12:00:00Z" in rows[0]
    assert "recall@50=0.25" in rows[0]
    assert "ranker.auc=0.7" in rows[0]
    assert "KiB" in rows[0]
    assert result.stderr == ""


def test_list_json(store_path: Path, versions: list[str]) -> None:
    result = run_cli("store", "list", "--store", f"file://{store_path}", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [item["version"] for item in listed] == versions
    assert [item["current"] for item in listed] == [False, False, True]
    assert listed[0]["created_at"] == "2024-05-01T12:00:00.000Z"
    assert listed[0]["artifacts"] == 2
    assert listed[0]["bytes"] == ModelStore(store_path).manifest(versions[0]).total_bytes
    assert listed[0]["metrics"] == {"ranker.auc": 0.7, "recall@50": 0.25}


def test_store_comes_from_the_environment_then_the_working_directory(
    tmp_path: Path, store_path: Path, versions: list[str]
) -> None:
    from_environment = run_cli("store", "list", "--json", environment={"RECSYS_STORE": str(store_path)})
    assert [item["version"] for item in json.loads(from_environment.stdout)] == versions
    from_directory = run_cli("store", "list", "--json", cwd=tmp_path)
    assert [item["version"] for item in json.loads(from_directory.stdout)] == versions


def test_list_of_an_empty_store(store_path: Path) -> None:
    store_path.mkdir()
    result = run_cli("store", "list", "--store", str(store_path))
    assert result.returncode == 0
    assert result.stdout == f"no versions in {store_path}\n"


def test_list_warns_when_current_is_broken(store_path: Path, versions: list[str]) -> None:
    (store_path / CURRENT_FILE).write_text("20200101T000000Z-abcdef\n")
    result = run_cli("store", "list", "--store", str(store_path))
    assert result.returncode == 0
    assert not any(row.startswith("*") for row in result.stdout.splitlines())
    assert (
        "warning: CURRENT names '20200101T000000Z-abcdef', which is not a complete version" in result.stderr
    )


def test_show_defaults_to_current(store_path: Path, versions: list[str]) -> None:
    result = run_cli("store", "show", "--store", str(store_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line.split(maxsplit=1) for line in lines]
    assert rows[0] == ["version", f"{versions[-1]} (current)"]
    assert ["path", str(store_path / versions[-1])] in rows
    assert rows[4][0] == "artifacts"
    assert rows[4][1].startswith("2 files, ")
    assert lines[5:] == [
        "capabilities:",
        '  channels       ["itemcf", "swing"]',
        "  rating         true",
        "metrics:",
        '  ranker         {"auc": 0.7}',
        "  recall@50      0.27",
        "data_source:",
        '  dataset        "movielens-100k"',
    ]


def test_show_json_of_a_named_version(store_path: Path, versions: list[str]) -> None:
    result = run_cli("store", "show", versions[0], "--store", str(store_path), "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["version"] == versions[0]
    assert shown["current"] is False
    assert shown["artifact_count"] == 2
    assert shown["metrics"]["recall@50"] == 0.25
    assert sorted(shown["artifacts"]) == ["itemcf/neighbors.npy", "ranker/ranker.onnx"]
    assert shown["path"] == str(store_path / versions[0])


def test_rollback(store_path: Path, versions: list[str]) -> None:
    result = run_cli("store", "rollback", versions[0], "--store", str(store_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"CURRENT: {versions[2]} -> {versions[0]}\n"
    assert (store_path / CURRENT_FILE).read_text() == f"{versions[0]}\n"
    again = run_cli("store", "rollback", versions[0], "--store", str(store_path))
    assert again.stdout == f"{versions[0]} verified; it was already current\n"


def test_rollback_to_a_corrupt_version_fails_and_keeps_current(store_path: Path, versions: list[str]) -> None:
    path = store_path / versions[0] / "ranker/ranker.onnx"
    path.write_bytes(b"X" + path.read_bytes()[1:])
    result = run_cli("store", "rollback", versions[0], "--store", str(store_path))
    assert_one_line_error(
        result, f"recsys store rollback: error: version '{versions[0]}': ranker/ranker.onnx: sha256 mismatch"
    )
    assert ModelStore(store_path).current() == versions[2]


def test_verify(store_path: Path, versions: list[str]) -> None:
    result = run_cli("store", "verify", "--store", str(store_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {versions[2]}: 2 artifacts,")
    path = store_path / versions[1] / "itemcf/neighbors.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    assert run_cli("store", "verify", versions[0], "--store", str(store_path)).returncode == 0
    broken = run_cli("store", "verify", versions[1], "--store", str(store_path))
    assert_one_line_error(broken, "recsys store verify: error: ")
    assert f"version '{versions[1]}': itemcf/neighbors.npy: sha256 mismatch" in broken.stderr
    path.unlink()
    missing = run_cli("store", "verify", versions[1], "--store", str(store_path))
    assert_one_line_error(missing, "itemcf/neighbors.npy: missing")


def test_prune(store_path: Path, versions: list[str]) -> None:
    ModelStore(store_path).rollback(versions[0])
    result = run_cli("store", "prune", "--keep", "2", "--store", str(store_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"deleted {versions[1]}\n"
    assert [info.name for info in ModelStore(store_path).versions()] == [versions[0], versions[2]]
    again = run_cli("store", "prune", "--keep", "2", "--store", str(store_path))
    assert again.stdout == "nothing to prune: 2 versions, keeping up to 2\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("rollback", "nope"), "recsys store rollback: error: VERSION: no version 'nope' in {store} (have: "),
        (("rollback", "../x"), "recsys store rollback: error: VERSION: invalid version name '../x'"),
        (("show", "nope"), "recsys store show: error: VERSION: no version 'nope' in {store}"),
        (("verify", ".staging-x"), "recsys store verify: error: VERSION: invalid version name '.staging-x'"),
        (("rollback",), "recsys store rollback: error: the following arguments are required: VERSION"),
        (("prune",), "recsys store prune: error: the following arguments are required: --keep"),
        (
            ("prune", "--keep", "0"),
            "recsys store prune: error: argument --keep: expected a whole number >= 1",
        ),
        (("prune", "--keep", "many"), "argument --keep: expected a whole number >= 1, got 'many'"),
        ((), "recsys store: error: the following arguments are required: SUBCOMMAND"),
    ],
)
def test_errors_are_one_line(
    store_path: Path, versions: list[str], args: tuple[str, ...], expected: str
) -> None:
    result = run_cli("store", *args, *(["--store", str(store_path)] if args else []))
    assert_one_line_error(result, expected.format(store=store_path))


def test_the_version_list_in_errors_names_the_versions(store_path: Path, versions: list[str]) -> None:
    result = run_cli("store", "rollback", "nope", "--store", str(store_path))
    assert f"(have: {', '.join(versions)})" in result.stderr


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("s3://bucket/store", "--store: unsupported store URL scheme 's3' in 's3://bucket/store'"),
        ("{tmp}/absent", "--store: no model store at {tmp}/absent: no such directory"),
    ],
)
def test_store_errors_name_the_flag(tmp_path: Path, location: str, expected: str) -> None:
    result = run_cli("store", "list", "--store", location.format(tmp=tmp_path))
    assert_one_line_error(result, f"recsys store list: error: {expected.format(tmp=tmp_path)}")


def test_missing_default_store_says_how_to_choose_one(tmp_path: Path) -> None:
    result = run_cli("store", "list", cwd=tmp_path)
    assert_one_line_error(
        result, "--store: no model store at ./store: no such directory (set --store or $RECSYS_STORE)"
    )
    from_environment = run_cli("store", "list", environment={"RECSYS_STORE": "gs://bucket"})
    assert_one_line_error(from_environment, "$RECSYS_STORE: unsupported store URL scheme 'gs'")


def test_show_without_current(store_path: Path) -> None:
    store_path.mkdir()
    result = run_cli("store", "show", "--store", str(store_path))
    assert_one_line_error(result, f"VERSION: none given and {store_path} has no CURRENT version yet")


def test_show_with_current_naming_a_missing_version(store_path: Path, versions: list[str]) -> None:
    (store_path / CURRENT_FILE).write_text("20200101T000000Z-abcdef\n")
    result = run_cli("store", "show", "--store", str(store_path))
    assert_one_line_error(
        result,
        f"recsys store show: error: CURRENT in {store_path} names version '20200101T000000Z-abcdef', "
        "which does not exist",
    )
