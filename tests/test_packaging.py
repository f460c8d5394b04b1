"""What a serving install promises: no TensorFlow on import, a CLI that works with `serve` alone."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import recsys
import services

ROOT = Path(__file__).resolve().parent.parent


def _all_modules(package: object) -> list[str]:
    path = package.__path__  # type: ignore[attr-defined]
    prefix = package.__name__ + "."  # type: ignore[attr-defined]
    return [name for _, name, _ in pkgutil.walk_packages(path, prefix)]


def test_importing_recsys_and_every_service_module_does_not_import_tensorflow() -> None:
    modules = ["recsys", "services", *_all_modules(recsys), *_all_modules(services)]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx'))\n"
        "print(len(sys.modules)); assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(modules) > 10


@pytest.mark.slow
def test_cli_works_in_an_environment_with_only_the_serve_extra(tmp_path: Path) -> None:
    env_dir = tmp_path / "serve-only"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    environment = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{ROOT}[serve]"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout.lower()
    for absent in ("tensorflow", "grpcio-tools", "pytest", "mypy", "locust"):
        assert f"{absent}==" not in listed, f"{absent} came with the serve extra"
    recsys_bin = env_dir / "bin" / "recsys"
    helped = subprocess.run(
        [str(recsys_bin), "--help"], capture_output=True, text=True, cwd=tmp_path, env=environment
    )
    assert helped.returncode == 0, helped.stderr
    assert "version" in helped.stdout
    versioned = subprocess.run(
        [str(recsys_bin), "version"], capture_output=True, text=True, cwd=tmp_path, env=environment
    )
    assert versioned.returncode == 0, versioned.stderr
    assert versioned.stdout.strip() == f"recsys {recsys.__version__}"
    # The gateway's demo page is served from the installed package: its files must be in it.
    page = subprocess.run(
        [
            str(python),
            "-c",
            "from services.gateway.http import UI_DIR, UI_FILES\n"
            "print(UI_DIR); print(sorted(p.name for p in UI_DIR.iterdir()))\n"
            "assert all((UI_DIR / name).is_file() for name, _ in UI_FILES.values())",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
    )
    assert page.returncode == 0, page.stderr
    assert str(env_dir) in page.stdout  # the installed copy, not the checkout's
    imported = subprocess.run(
        [str(python), "-c", "import services.common.workers, services.common.channels, recsys.cli"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
    )
    assert imported.returncode == 0, imported.stderr
