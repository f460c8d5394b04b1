"""Generate the Python gRPC code and its type stubs from protos/.

    python scripts/gen_protos.py            # writes recsys/v1/*_pb2*.py(i)
    python scripts/gen_protos.py --out DIR  # writes DIR/recsys/v1/... (the staleness test)

The generated files are committed so that a serving install needs no protoc; the test
tests/test_protos.py regenerates them into a temporary directory and fails when the
committed copies are stale. Needs the `dev` extra (grpcio-tools, mypy-protobuf).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("recsys") / "v1"
INIT_TEXT = '"""Generated gRPC contract `recsys.v1` (see protos/recsys/v1). Do not edit."""\n'


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) with the mypy-protobuf plugins into `out`."""
    import grpc_tools
    from grpc_tools import protoc

    bin_dir = Path(sys.executable).parent
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    (out / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(path.relative_to(PROTO_ROOT)) for path in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see above)")
    (out / PACKAGE_DIR / "__init__.py").write_text(INIT_TEXT)
    (out / PACKAGE_DIR / "py.typed").write_text("")
    return sorted(p for p in (out / PACKAGE_DIR).iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    main()
