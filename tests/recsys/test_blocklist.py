"""The blocklist: parsing, per-version indexes, the filter's kept and removed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.blocklist import Blocklist, BlocklistFile, BlocklistFilter, VersionBlocklists
from recsys.stages.sources import Candidates

LOOKUP = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}


def test_parse_skips_comments_blanks_and_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "blocked.txt"
    path.write_text("# taken down 2025-06\n b \n\nd  # legal request\n#e\nzz\n")
    blocklist = Blocklist.load(path)
    assert blocklist.item_ids == frozenset({"b", "d", "zz"})
    assert len(blocklist) == 3
    assert "b" in blocklist
    assert "e" not in blocklist


def test_indexes_keep_only_items_the_version_knows() -> None:
    assert Blocklist.of(["d", "b", "zz", "", " b "]).indexes(LOOKUP).tolist() == [1, 3]
    assert Blocklist.of([]).indexes(LOOKUP).dtype == np.int32


def test_filter_drops_blocked_items_and_counts_them() -> None:
    blocklist_filter = BlocklistFilter.for_version(Blocklist.of(["b", "d", "zz"]), LOOKUP)
    assert blocklist_filter.identifier == "blocklist"
    assert blocklist_filter.blocked.tolist() == [1, 3]
    candidates = Candidates(np.array([4, 3, 0, 1], np.int32), np.array([0.9, 0.8, 0.7, 0.6], np.float32))
    filtered = blocklist_filter.apply(candidates)
    assert filtered.kept.items.tolist() == [4, 0]
    np.testing.assert_allclose(filtered.kept.scores, [0.9, 0.7])
    assert filtered.removed == 2


def test_empty_blocklist_or_candidates_pass_through() -> None:
    candidates = Candidates(np.array([2, 1], np.int32), np.array([0.5, 0.4], np.float32))
    assert BlocklistFilter(np.zeros(0, np.int32)).apply(candidates).kept is candidates
    nothing = BlocklistFilter(np.array([1], np.int32)).apply(Candidates.empty())
    assert (len(nothing.kept), nothing.removed) == (0, 0)


def test_a_blocklist_file_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "blocked.txt"
    path.write_text("a\nb\n")
    source = BlocklistFile(path)
    assert source.blocklist.item_ids == frozenset({"a", "b"})
    assert source.reload() is False
    path.write_text("a\nb\nc\n")
    assert source.reload() is True
    assert source.blocklist.item_ids == frozenset({"a", "b", "c"})
    path.unlink()
    with pytest.raises(FileNotFoundError):
        source.reload()
    assert source.blocklist.item_ids == frozenset({"a", "b", "c"})  # the last good one stays


def test_version_blocklists_build_one_filter_per_version_and_forget_retired_ones() -> None:
    filters = VersionBlocklists(Blocklist.of(["x", "y"]))
    first = filters.for_version("v1", {"x": 3, "z": 0})
    assert first.blocked.tolist() == [3]
    assert filters.for_version("v1", {}) is first
    second = filters.for_version("v2", {"y": 1, "x": 5}, servable=["v2"])
    assert second.blocked.tolist() == [1, 5]
    assert filters.for_version("v1", {"x": 4}).blocked.tolist() == [4]  # v1 was dropped, rebuilt
    filters.replace(Blocklist.of(["z"]))
    assert filters.for_version("v1", {"x": 3, "z": 0}).blocked.tolist() == [0]
