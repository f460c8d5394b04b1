"""The committed generated code matches protos/ (regenerated with the pinned tools)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from recsys.v1 import common_pb2, gateway_pb2, rank_pb2, recall_pb2

ROOT = Path(__file__).resolve().parent.parent


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
