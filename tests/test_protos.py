"""The contract: the committed generated code matches protos/ (regenerated with the pinned
tools), buf's lint rules hold, and nothing breaks the last released contract
(protos/baseline/recsys-v1.binpb, `make proto-baseline` at a release)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from recsys.v1 import catalogue_pb2, common_pb2, gateway_pb2, rank_pb2, recall_pb2

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "tools" / "buf" / "node_modules" / ".bin" / "buf"
BASELINE = ROOT / "protos" / "baseline" / "recsys-v1.binpb"
GATEWAY_PROTO = Path("protos") / "recsys" / "v1" / "gateway.proto"


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {path.name: path.read_bytes() for path in (tmp_path / "recsys" / "v1").iterdir()}
    committed = {
        path.name: path.read_bytes() for path in (ROOT / "recsys" / "v1").iterdir() if path.is_file()
    }
    assert sorted(fresh) == sorted(committed), "run: python scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}; run: python scripts/gen_protos.py"


def _fields(message: type) -> dict[str, int]:
    proto = descriptor_pb2.DescriptorProto()
    message.DESCRIPTOR.CopyToProto(proto)  # type: ignore[attr-defined]
    return {field.name: field.number for field in proto.field}


def test_internal_hops_carry_packed_numeric_candidates() -> None:
    # Candidates cross the internal hops as packed arrays, not one message per item.
    for message, names in (
        (recall_pb2.RecallResponse, ("item_indexes", "scores", "channel_masks", "user_embedding")),
        (rank_pb2.RankRequest, ("item_indexes", "user_embedding")),
        (rank_pb2.RankResponse, ("item_indexes", "scores")),
    ):
        descriptor = message.DESCRIPTOR
        for name in names:
            field = descriptor.fields_by_name[name]
            assert field.is_repeated, name
            assert field.message_type is None, f"{message.__name__}.{name} must be numeric"
            assert field.is_packed, f"{message.__name__}.{name} must be packed"
    # Every internal request names the model version its indexes belong to.
    for request in (recall_pb2.RecallRequest, rank_pb2.RankRequest, rank_pb2.PreRankRequest):
        assert "model_version" in _fields(request)


def test_public_api_uses_external_string_ids() -> None:
    assert gateway_pb2.RecommendRequest.DESCRIPTOR.fields_by_name["user_id"].type == 9  # TYPE_STRING
    assert gateway_pb2.RecommendedItem.DESCRIPTOR.fields_by_name["item_id"].type == 9
    assert {"region", "request_time", "attributes"} <= set(_fields(common_pb2.RequestContext))
    assert {"dry_run", "debug", "request_id", "exclude_item_ids", "count", "scene"} <= set(
        _fields(gateway_pb2.RecommendRequest)
    )


# -- buf: lint and breaking changes ----------------------------------------------------------
def buf(*arguments: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():  # `make install` puts it there (tools/buf/package.json)
        pytest.fail(f"{BUF.relative_to(ROOT)} is missing: run `make install`")
    return subprocess.run([str(BUF), *arguments], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint_passes() -> None:
    result = buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_nothing_breaks_the_released_contract() -> None:
    result = buf("breaking", "--against", str(BASELINE))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}(or, at a release: make proto-baseline)"


def _contract_copy(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos" / "recsys", tmp_path / "protos" / "recsys")
    return tmp_path


@pytest.mark.parametrize(
    ("change", "before", "after", "complaint"),
    [
        ("renamed field", "string user_id = 1;", "string user = 1;", "changed name"),
        ("removed field", "  bool dry_run = 7;\n", "", "deleted"),
        ("renumbered field", "string scene = 2;", "string scene = 20;", ""),
        ("changed type", "int32 count = 3;", "int64 count = 3;", "type"),
    ],
)
def test_buf_breaking_fails_on_a_changed_field(
    tmp_path: Path, change: str, before: str, after: str, complaint: str
) -> None:
    copy = _contract_copy(tmp_path)
    proto = copy / GATEWAY_PROTO
    text = proto.read_text()
    assert text.count(before) == 1, before
    proto.write_text(text.replace(before, after))
    result = buf("breaking", "--against", str(BASELINE), cwd=copy)
    assert result.returncode != 0, f"{change} passed buf breaking"
    assert "gateway.proto" in result.stdout
    assert complaint in result.stdout, result.stdout


def test_buf_breaking_allows_an_added_field(tmp_path: Path) -> None:
    copy = _contract_copy(tmp_path)
    proto = copy / GATEWAY_PROTO
    text = proto.read_text()
    added = re.sub(
        r"(  string request_id = 8;\n)", r"\1\n  // Added later.\n  string page = 99;\n", text, count=1
    )
    assert added != text
    proto.write_text(added)
    result = buf("breaking", "--against", str(BASELINE), cwd=copy)
    assert result.returncode == 0, result.stdout + result.stderr


# -- other languages: packages from the files alone, no generator flags ----------------------
def test_every_proto_names_its_package_for_go_java_and_csharp() -> None:
    for module in (catalogue_pb2, common_pb2, gateway_pb2, rank_pb2, recall_pb2):
        options = module.DESCRIPTOR.GetOptions()
        name = module.DESCRIPTOR.name
        assert options.go_package == "github.com/recsys/recsys/gen/go/recsys/v1;recsysv1", name
        assert options.java_package == "io.recsys.v1", name
        assert options.java_multiple_files, name
        assert options.java_outer_classname, name
        assert options.csharp_namespace == "Recsys.V1", name
