"""What a model version holds, as arrays: the one in-memory form that training writes,
evaluation reads and the services load (memory-mapped, without TensorFlow).

Index conventions (used by every artifact and by the ONNX models' inputs):
- items and users have dense indexes 0 … n−1 (`item_ids[i]` is the external id of item i);
- model inputs use *tokens* = index + 1, with token 0 meaning "unknown / padding": the
  feature spec's default for unknown ids. Categories, authors and regions are tokens too
  (0 = none), with their vocabularies stored beside them (token t ↔ vocab[t − 1]).
"""

from __future__ import annotations

import json
import threading
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from recsys.neighbors import NeighborTable

IntArray = npt.NDArray[np.int32]
Int64Array = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]
StrArray = npt.NDArray[np.str_]


@dataclass(frozen=True)
class Ragged:
    """Rows of varying length in CSR form: row r is `values[offsets[r]:offsets[r + 1]]`."""

    offsets: Int64Array
    values: npt.NDArray[Any]

    @classmethod
    def from_groups(cls, group: npt.NDArray[Any], values: npt.NDArray[Any], n_groups: int) -> Ragged:
        """Rows from (group, value) pairs; pairs must already be sorted by group (stable
        within a group: the order inside each row is kept)."""
        counts = np.bincount(group, minlength=n_groups)
        offsets = np.zeros(n_groups + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(offsets, values)

    @property
    def n_rows(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def row(self, index: int) -> npt.NDArray[Any]:
        return self.values[self.offsets[index] : self.offsets[index + 1]]

    def lengths(self) -> Int64Array:
        return np.diff(self.offsets)


@dataclass(frozen=True)
class UserHistory:
    """Every training interaction of every user, each row sorted oldest → newest.

    The row is the user's complete consumed set (the "never recommend again" filter); its
    tail is the recent history that feeds CF channels and the towers."""

    items: Ragged  # int32 item indexes
    times: Ragged  # int64 unix seconds (0 when the data has no time)
    ratings: Ragged  # float32 (NaN when the data has no rating)


@dataclass(frozen=True)
class Catalogue:
    item_ids: StrArray
    titles: StrArray
    categories: IntArray  # [n_items, max_categories] category tokens, 0 pads
    category_vocab: StrArray
    authors: IntArray  # [n_items] author tokens, 0 = unknown
    author_vocab: StrArray
    item_time: FloatArray  # [n_items] year or unix time, NaN unknown

    @property
    def n_items(self) -> int:
        return int(self.item_ids.shape[0])


@dataclass(frozen=True)
class UserBase:
    user_ids: StrArray
    regions: IntArray  # [n_users] region tokens, 0 = unknown
    region_vocab: StrArray

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])


@dataclass(frozen=True)
class Popularity:
    global_scores: FloatArray  # [n_items], recency-decayed where time exists
    global_top: IntArray  # item indexes, best first
    by_region: Ragged  # region token → item indexes, best first (row 0: unknown region, empty)
    by_region_scores: Ragged  # aligned float32 scores


@dataclass(frozen=True)
class AuthorIndex:
    items: Ragged  # author token → item indexes, best first (row 0 empty)
    scores: Ragged  # aligned float32 scores (popularity blended with recency)


@dataclass(frozen=True)
class Statistics:
    """Dense per-user and per-item features (already normalised for the models)."""

    user_stats: FloatArray  # [n_users, n_user_stats]
    item_stats: FloatArray  # [n_items, n_item_stats]
    user_stat_names: tuple[str, ...]
    item_stat_names: tuple[str, ...]


@dataclass(frozen=True)
class CoreArtifacts:
    """Everything but the neural models: enough for the CF, geo, author and popular channels.

    `ease` is optional: a version built without EASE (retrieval-only, a catalogue above EASE's
    limit, or one published before the channel existed) has none, stores nothing for it, and
    serves without the `ease` channel."""

    catalogue: Catalogue
    users: UserBase
    history: UserHistory
    popularity: Popularity
    authors: AuthorIndex
    statistics: Statistics
    itemcf: NeighborTable
    swing: NeighborTable
    like_threshold: float | None  # rating ≥ threshold is a like; None: every interaction is one
    ease: NeighborTable | None = None  # EASE's B truncated to each item's top-k positive weights


OPTIONAL_TABLE = NeighborTable | None


class ArraySink(Protocol):
    """Where arrays are written (the store's version writer)."""

    def save_array(self, relative_path: str, array: npt.NDArray[Any]) -> Path: ...

    def save_json(self, relative_path: str, data: Any) -> Path: ...


# -- (de)serialisation: one .npy per array, laid out by dataclass field names ----------------
def _items(prefix: str, value: object) -> Iterator[tuple[str, Any]]:
    if isinstance(value, np.ndarray):
        yield f"{prefix}.npy", value
    elif isinstance(value, Ragged):
        yield f"{prefix}/offsets.npy", value.offsets
        yield f"{prefix}/values.npy", value.values
    elif isinstance(value, NeighborTable):
        yield f"{prefix}/neighbors.npy", value.neighbors
        yield f"{prefix}/scores.npy", value.scores
    elif isinstance(value, tuple):
        yield f"{prefix}.json", list(value)
    elif value is None or isinstance(value, (int, float, str)):
        yield f"{prefix}.json", value
    else:
        hints = typing.get_type_hints(type(value))
        for item in fields(value):  # type: ignore[arg-type]
            member = getattr(value, item.name)
            if member is None and hints[item.name] == OPTIONAL_TABLE:
                continue  # an absent optional table leaves no file, as in versions without it
            yield from _items(f"{prefix}/{item.name}", member)


def save_core(core: CoreArtifacts, sink: ArraySink) -> None:
    for path, value in _items("core", core):
        if path.endswith(".json"):
            sink.save_json(path, value)
        else:
            sink.save_array(path, value)


def _load(kind: type, directory: Path, mmap: bool) -> Any:
    if kind is Ragged:
        return Ragged(_npy(directory / "offsets.npy", mmap), _npy(directory / "values.npy", mmap))
    if kind is NeighborTable:
        return NeighborTable(_npy(directory / "neighbors.npy", mmap), _npy(directory / "scores.npy", mmap))
    values: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(kind).items():
        origin = typing.get_origin(hint) or hint
        if hint == OPTIONAL_TABLE:
            table = directory / name
            values[name] = _load(NeighborTable, table, mmap) if table.is_dir() else None
        elif origin is np.ndarray:
            values[name] = _npy(directory / f"{name}.npy", mmap)
        elif origin is tuple:
            values[name] = tuple(json.loads((directory / f"{name}.json").read_text()))
        elif origin in (float, int, str, types.UnionType, typing.Union):
            values[name] = json.loads((directory / f"{name}.json").read_text())
        else:
            values[name] = _load(origin, directory / name, mmap)
    return kind(**values)


# CPython 3.11 before 3.11.8 can fail `ast` parsing in two threads at once with "SystemError:
# AST constructor recursion depth mismatch" (cpython#106905); `np.load` parses each .npy
# header with `ast.literal_eval`, and the services load versions in threads. One lock around
# the loads keeps them from parsing concurrently (a load is a header read and an mmap).
_LOAD_LOCK = threading.Lock()


def load_npy(path: Path, mmap: bool = True) -> npt.NDArray[Any]:
    """`np.load` of one array (memory-mapped by default), never two at once in a process."""
    with _LOAD_LOCK:
        for attempt in range(3):
            try:
                loaded: npt.NDArray[Any] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
                return loaded
            except SystemError:
                # The lock cannot cover every parser in the process (another thread's import
                # or literal_eval can race it, seen in CI): the mismatch is transient, retry.
                if attempt == 2:
                    raise
    raise AssertionError("unreachable")


def _npy(path: Path, mmap: bool) -> npt.NDArray[Any]:
    loaded = load_npy(path, mmap)
    # A plain ndarray view of the mapping (no copy): every slice of an np.memmap builds
    # another memmap object, which cost about 20 Python calls per recall request.
    array: npt.NDArray[Any] = np.asarray(loaded)
    return array


def load_core(version_dir: Path, mmap: bool = True) -> CoreArtifacts:
    """Load the core arrays of a version; memory-mapped by default, so several worker
    processes share one copy in the page cache."""
    core: CoreArtifacts = _load(CoreArtifacts, version_dir / "core", mmap)
    return core


@dataclass(frozen=True)
class HistoryWeighting:
    """How an item-to-item channel weighs a user's history: the newest `items` of it (0: the
    version's `recent_items`), the newest weighing 1, each step back × `decay`, a liked item
    × `liked_boost`. The defaults are ItemCF's and Swing's."""

    items: int = 0
    decay: float = 0.9
    liked_boost: float = 2.0


@dataclass
class Defaults:
    """Serving defaults chosen on the validation split, written into the version.

    `history_weighting` holds the channels whose weighting differs from `HistoryWeighting()`
    (versions written before it existed have none)."""

    channel_weights: dict[str, float] = field(default_factory=dict)
    channel_quotas: dict[str, int] = field(default_factory=dict)
    recent_items: int = 20
    candidate_budget: int = 200
    history_weighting: dict[str, HistoryWeighting] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Read back from JSON, the weightings are plain objects.
        self.history_weighting = {
            name: value if isinstance(value, HistoryWeighting) else HistoryWeighting(**value)
            for name, value in self.history_weighting.items()
        }

    def weighting(self, channel: str) -> HistoryWeighting:
        return self.history_weighting.get(channel, HistoryWeighting())
