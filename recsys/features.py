"""The feature spec (the ONNX models' named inputs) and the numpy code that assembles them.

Training builds its TensorFlow inputs with these same functions, and the services build
their onnxruntime inputs with them, so what a model saw in training is what it sees in
serving. Unknown users and items map to token 0, the spec's default.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.artifacts import Catalogue, FloatArray, Int64Array, Statistics, UserBase

Inputs = dict[str, npt.NDArray[Any]]

# Features of a (user, candidate) pair that recall already knows how to compute: how similar
# the candidate is to the user's history by ItemCF and by Swing (mean and max over the
# history), and the two-tower score. They are computed from the same tables at training
# time (from an earlier period than the labels) and at serving time.
CROSS_FEATURES = ("itemcf_mean", "itemcf_max", "swing_mean", "swing_max", "two_tower")


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str  # "int64" | "float32"
    shape: tuple[int | None, ...]  # None = any (the batch dimension)


@dataclass(frozen=True)
class FeatureSpec:
    n_user_tokens: int  # vocabulary sizes including token 0 (unknown / padding)
    n_item_tokens: int
    n_category_tokens: int
    n_author_tokens: int
    n_region_tokens: int
    history_length: int
    max_categories: int
    user_stat_names: tuple[str, ...]
    item_stat_names: tuple[str, ...]
    embedding_dim: int
    heads: tuple[str, ...]
    liked_history_weight: float = 2.0  # a liked item counts this much in the pooled history
    default_token: int = 0
    cross_feature_names: tuple[str, ...] = CROSS_FEATURES
    # The recall channels whose rank and score the ranker reads (`provenance_features`);
    # empty for versions trained before provenance existed (their ranker has no such input).
    provenance_channels: tuple[str, ...] = ()
    # The item tower's content inputs (`recsys.content`), so that it embeds an item it has
    # never seen from its metadata: hashed publisher and title-token buckets and the
    # publication-year bucket (token 0 = absent in each). 0 buckets: a version trained before
    # content inputs existed (its item tower takes the id, categories and author only).
    n_publisher_buckets: int = 0
    n_title_buckets: int = 0
    max_title_tokens: int = 0
    n_year_buckets: int = 0

    @property
    def has_content(self) -> bool:
        return self.n_title_buckets > 0

    @property
    def provenance_width(self) -> int:
        return provenance_width(self.provenance_channels)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = {
            model: [asdict(spec) for spec in specs]
            for model, specs in (
                ("user_tower", self.user_tower_inputs()),
                ("item_tower", self.item_tower_inputs()),
                ("ranker", self.ranker_inputs()),
            )
        }
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureSpec:
        values = {key: value for key, value in data.items() if key != "inputs"}
        for key in (
            "user_stat_names",
            "item_stat_names",
            "heads",
            "cross_feature_names",
            "provenance_channels",
        ):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    # -- the named inputs of each exported model ------------------------------------------
    def user_tower_inputs(self) -> list[InputSpec]:
        return [
            InputSpec("user_id", "int64", (None,)),
            InputSpec("region", "int64", (None,)),
            InputSpec("history", "int64", (None, self.history_length)),
            InputSpec("history_weight", "float32", (None, self.history_length)),
        ]

    def item_inputs(self) -> list[InputSpec]:
        """The item's id-and-vocabulary inputs, which the ranker reads too."""
        return [
            InputSpec("item_id", "int64", (None,)),
            InputSpec("categories", "int64", (None, self.max_categories)),
            InputSpec("author", "int64", (None,)),
        ]

    def content_inputs(self) -> list[InputSpec]:
        """The item tower's content inputs (none for a version trained without them); the
        ranker does not read them: a new item reaches it through its categories and author."""
        if not self.has_content:
            return []
        return [
            InputSpec("publisher", "int64", (None,)),
            InputSpec("publication_year", "int64", (None,)),
            InputSpec("title_tokens", "int64", (None, self.max_title_tokens)),
        ]

    def item_tower_inputs(self) -> list[InputSpec]:
        return [*self.item_inputs(), *self.content_inputs()]

    def ranker_inputs(self) -> list[InputSpec]:
        return [
            *self.user_tower_inputs(),
            InputSpec("user_stats", "float32", (None, len(self.user_stat_names))),
            *self.item_inputs(),
            InputSpec("item_stats", "float32", (None, len(self.item_stat_names))),
            InputSpec("cross_features", "float32", (None, len(self.cross_feature_names))),
            # The two-tower embeddings of the user and the candidate: pretrained on far more
            # rows than the ranker sees, so the ranker starts from what retrieval learned.
            InputSpec("user_vector", "float32", (None, self.embedding_dim)),
            InputSpec("item_vector", "float32", (None, self.embedding_dim)),
            *(
                [InputSpec("provenance", "float32", (None, self.provenance_width))]
                if self.provenance_channels
                else []
            ),
        ]


@dataclass(frozen=True)
class Provenance:
    """Where each of one user's candidates came from, aligned with the candidates: recall's
    merge output (`recsys.stages.merge.MergedCandidates.provenance`), carried from recall
    through the gateway to rank."""

    channel_names: tuple[str, ...]  # the columns of `ranks` and `scores`
    ranks: npt.NDArray[np.int16]  # [n, C]: rank in the channel's list (0 = first), −1 absent
    scores: FloatArray  # [n, C]: the channel's score / max |score| of its list, 0 absent
    merge_scores: FloatArray  # [n]: the merge's score (higher first)

    def __len__(self) -> int:
        return int(self.merge_scores.shape[0])

    def take(self, positions: npt.NDArray[Any]) -> Provenance:
        return Provenance(
            self.channel_names, self.ranks[positions], self.scores[positions], self.merge_scores[positions]
        )

    @classmethod
    def absent(cls, n: int) -> Provenance:
        """No recall answer to read (a direct rank call): every candidate found by nothing."""
        return cls((), np.zeros((n, 0), np.int16), np.zeros((n, 0), np.float32), np.zeros(n, np.float32))


def provenance_width(channels: Sequence[str]) -> int:
    return 2 * (len(channels) + 1) + 1 if channels else 0


def _rank_discount(ranks: npt.NDArray[Any]) -> FloatArray:
    """1 / log2(2 + rank) (NDCG's discount: 1 for the first), 0 for −1 (absent)."""
    ranks = np.asarray(ranks)
    values = 1.0 / np.log2(2.0 + np.maximum(ranks, 0).astype(np.float32))
    return np.where(ranks >= 0, values, 0.0).astype(np.float32)


def provenance_features(channels: Sequence[str], provenance: Provenance) -> FloatArray:
    """The ranker's `provenance` input for one user's candidates: for each of `channels` (the
    version's, in the spec's order) the rank discount and the scaled score, then the same two
    for the merge (its rank among these candidates by merge score), then the share of the
    channels that found the candidate. A channel the provenance does not name is absent.
    Training rows and the services call this one function on the same merge output."""
    n = len(provenance)
    features = np.zeros((n, provenance_width(channels)), np.float32)
    if n == 0 or not channels:
        return features
    column = {name: index for index, name in enumerate(provenance.channel_names)}
    found = np.zeros(n, np.float32)
    for position, name in enumerate(channels):
        index = column.get(name)
        if index is None:
            continue
        ranks = provenance.ranks[:, index]
        features[:, 2 * position] = _rank_discount(ranks)
        features[:, 2 * position + 1] = np.where(ranks >= 0, provenance.scores[:, index], 0.0)
        found += ranks >= 0
    merge = np.asarray(provenance.merge_scores, dtype=np.float32)
    order = np.argsort(-merge, kind="stable")
    merge_rank = np.empty(n, np.int64)
    merge_rank[order] = np.arange(n)
    top = float(np.abs(merge).max())
    features[:, 2 * len(channels)] = np.where(merge > 0, _rank_discount(merge_rank), 0.0)
    features[:, 2 * len(channels) + 1] = merge / top if top > 0 else 0.0
    features[:, -1] = found / len(channels)
    return features


def history_inputs(
    spec: FeatureSpec, recent_items: npt.NDArray[Any], recent_liked: npt.NDArray[np.bool_]
) -> tuple[Int64Array, FloatArray]:
    """One user's history input: item tokens most recent first, padded with 0.

    `recent_items` are item indexes oldest → newest (as stored); only the last
    `history_length` are used."""
    length = spec.history_length
    items = np.asarray(recent_items[-length:], dtype=np.int64)[::-1]
    liked = np.asarray(recent_liked[-length:], dtype=bool)[::-1]
    tokens = np.zeros(length, dtype=np.int64)
    weights = np.zeros(length, dtype=np.float32)
    tokens[: items.shape[0]] = items + 1
    weights[: items.shape[0]] = np.where(liked, spec.liked_history_weight, 1.0)
    return tokens, weights


def history_matrix(
    spec: FeatureSpec,
    item_sequence: npt.NDArray[Any],
    liked_sequence: npt.NDArray[np.bool_],
    row_start: npt.NDArray[np.int64],
    row_end: npt.NDArray[np.int64],
) -> tuple[Int64Array, FloatArray]:
    """Vectorised `history_inputs` for many rows: row r's history is the sequence slice
    [row_start[r], row_end[r]) (oldest → newest), cut to its last `history_length`."""
    length = spec.history_length
    positions = row_end[:, None] - 1 - np.arange(length)[None, :]  # most recent first
    valid = positions >= row_start[:, None]
    safe = np.where(valid, positions, 0)
    tokens = np.where(valid, item_sequence[safe].astype(np.int64) + 1, 0)
    weights = np.where(valid, np.where(liked_sequence[safe], spec.liked_history_weight, 1.0), 0.0)
    return tokens.astype(np.int64), weights.astype(np.float32)


class ItemFeatures:
    """Per-item inputs gathered vectorised from the catalogue arrays."""

    def __init__(self, catalogue: Catalogue, statistics: Statistics) -> None:
        self._categories = np.asarray(catalogue.categories, dtype=np.int64)
        self._authors = np.asarray(catalogue.authors, dtype=np.int64)
        self._stats = np.asarray(statistics.item_stats, dtype=np.float32)
        self.n_items = catalogue.n_items
        # A row for unknown items (index −1 → the last row): token 0 everywhere, zero stats.
        self._categories = np.vstack([self._categories, np.zeros((1, self._categories.shape[1]), np.int64)])
        self._authors = np.append(self._authors, 0)
        self._stats = np.vstack([self._stats, np.zeros((1, self._stats.shape[1]), np.float32)])

    def known(self, item_indexes: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        return (item_indexes >= 0) & (item_indexes < self.n_items)

    def inputs(self, item_indexes: npt.NDArray[Any], with_stats: bool = True) -> Inputs:
        indexes = np.asarray(item_indexes, dtype=np.int64)
        known = self.known(indexes)
        rows = np.where(known, indexes, self.n_items)
        result: Inputs = {
            "item_id": np.where(known, indexes + 1, 0).astype(np.int64),
            "categories": self._categories[rows],
            "author": self._authors[rows],
        }
        if with_stats:
            result["item_stats"] = self._stats[rows]
        return result


class UserFeatures:
    """Per-user inputs: token, region, stats, from the user base and statistics arrays."""

    def __init__(self, spec: FeatureSpec, users: UserBase, statistics: Statistics) -> None:
        self.spec = spec
        self._regions = np.asarray(users.regions, dtype=np.int64)
        self._stats = np.asarray(statistics.user_stats, dtype=np.float32)
        self.n_users = users.n_users

    def inputs(
        self,
        user_index: int,
        recent_items: npt.NDArray[Any],
        recent_liked: npt.NDArray[np.bool_],
        region_token: int | None = None,
    ) -> Inputs:
        """Inputs of one user (index −1 = unknown) as a batch of one."""
        known = 0 <= user_index < self.n_users
        region = (
            region_token if region_token is not None else (int(self._regions[user_index]) if known else 0)
        )
        tokens, weights = history_inputs(self.spec, recent_items, recent_liked)
        stats = self._stats[user_index] if known else np.zeros(self._stats.shape[1], np.float32)
        return {
            "user_id": np.array([user_index + 1 if known else 0], dtype=np.int64),
            "region": np.array([region], dtype=np.int64),
            "history": tokens[None, :],
            "history_weight": weights[None, :],
            "user_stats": stats[None, :].astype(np.float32),
        }


class PairScores:
    """Similarity lookups (item a, item b) → score from a neighbour table, by binary search
    over sorted pair keys: no items × items matrix, and vectorised over any shape."""

    def __init__(self, neighbors: npt.NDArray[Any], scores: npt.NDArray[Any]) -> None:
        n_items, k = neighbors.shape
        self._n_items = np.int64(n_items)
        rows = np.repeat(np.arange(n_items, dtype=np.int64), k)
        columns = np.asarray(neighbors, dtype=np.int64).reshape(-1)
        valid = columns >= 0
        keys = rows[valid] * self._n_items + columns[valid]
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._values = np.asarray(scores, dtype=np.float32).reshape(-1)[valid][order]
        self._neighbors = neighbors
        self._scores = scores
        self._scratch = threading.local()

    def lookup(self, first: npt.NDArray[Any], second: npt.NDArray[Any]) -> FloatArray:
        """Score of each (first, second) pair; 0 for unknown items or non-neighbours."""
        first = np.asarray(first, dtype=np.int64)
        second = np.asarray(second, dtype=np.int64)
        known = (first >= 0) & (first < self._n_items) & (second >= 0) & (second < self._n_items)
        keys = np.where(known, first * self._n_items + second, -1)
        if self._keys.shape[0] == 0:
            return np.zeros(keys.shape, np.float32)
        position = np.minimum(np.searchsorted(self._keys, keys), self._keys.shape[0] - 1)
        found = known & (self._keys[position] == keys)
        return np.where(found, self._values[position], 0.0).astype(np.float32)

    def lookup_history(self, history: npt.NDArray[Any], candidates: npt.NDArray[Any]) -> FloatArray:
        """`lookup` of one history against many candidates: [n, L] with [c, l] the score of
        (history[l], candidates[c]), the same values. It reads the L history items'
        neighbour rows (L·k entries) instead of binary-searching n·L pairs among all keys,
        which is what serving one user's candidates needs (~10× fewer cache misses), and
        finds each neighbour's candidate row through a catalogue-sized map (one gather, where
        a binary search of L·k neighbours among the candidates cost ~3× more)."""
        history = np.asarray(history, dtype=np.int64).reshape(-1)
        candidates = np.asarray(candidates, dtype=np.int64)
        n = candidates.shape[0]
        result = np.zeros((n, history.shape[0]), np.float32)
        positions = np.flatnonzero((history >= 0) & (history < self._n_items))
        known = (candidates >= 0) & (candidates < self._n_items)
        if positions.shape[0] == 0 or not known.any():
            return result
        neighbors = np.asarray(self._neighbors[history[positions]], dtype=np.intp)  # [P, k]
        scores = np.asarray(self._scores[history[positions]], dtype=np.float32)
        row_of = self._row_map()
        # Each known candidate's row (a repeated candidate: its last row, copied below).
        rows, members = np.flatnonzero(known), candidates[known]
        row_of[members] = rows
        try:
            row = np.where(neighbors >= 0, row_of[np.maximum(neighbors, 0)], -1)
            own = row_of[members]
        finally:
            row_of[members] = -1  # clean for the next call, whatever happened
        hit = row >= 0
        columns = np.broadcast_to(positions[:, None], neighbors.shape)
        # Reversed, so that a pair listed twice in a row keeps its first score, as `lookup` does.
        result[row[hit][::-1], columns[hit][::-1]] = scores[hit][::-1]
        if own.shape[0] and not np.array_equal(own, rows):  # repeated candidates share a row
            result[rows] = result[own]
        return result

    def _row_map(self) -> npt.NDArray[np.int32]:
        """This thread's catalogue-sized map (−1 everywhere between calls; int32: 4 MB for a
        million items): rank's scorer threads each use their own, none allocated per call."""
        row_of: npt.NDArray[np.int32] | None = getattr(self._scratch, "row_of", None)
        if row_of is None:
            row_of = np.full(int(self._n_items), -1, dtype=np.int32)
            self._scratch.row_of = row_of
        return row_of


class CrossFeatures:
    """The `cross_features` input for rows of (history tokens, candidate item, user vector)."""

    def __init__(self, itemcf: PairScores, swing: PairScores, item_embeddings: npt.NDArray[Any]) -> None:
        self._itemcf = itemcf
        self._swing = swing
        self._embeddings = np.asarray(item_embeddings, dtype=np.float32)

    def inputs(
        self,
        history: npt.NDArray[Any],
        history_weight: npt.NDArray[Any],
        items: npt.NDArray[Any],
        user_embedding: npt.NDArray[Any] | None,
        one_user: bool = False,
    ) -> Inputs:
        """The ranker inputs that come from recall's artifacts: `cross_features`,
        `user_vector`, `item_vector` (zeros for unknown items or a missing user vector).
        `one_user`: every row has the same history (one user's candidates; the serving
        case), so the cheaper `compute_one_user` gives the same values."""
        items = np.asarray(items, dtype=np.int64)
        n, dim = items.shape[0], self._embeddings.shape[1]
        known = (items >= 0) & (items < self._embeddings.shape[0])
        item_vector = np.where(known[:, None], self._embeddings[np.where(known, items, 0)], 0.0)
        if user_embedding is None:
            user_vector = np.zeros((n, dim), np.float32)
        else:
            user = np.asarray(user_embedding, dtype=np.float32)
            user_vector = np.broadcast_to(user, (n, dim)) if user.ndim == 1 else user
        compute = self.compute_one_user if one_user else self.compute
        return {
            "cross_features": compute(history, history_weight, items, user_embedding),
            "user_vector": np.ascontiguousarray(user_vector, dtype=np.float32),
            "item_vector": item_vector.astype(np.float32),
        }

    def compute(
        self,
        history: npt.NDArray[Any],
        history_weight: npt.NDArray[Any],
        items: npt.NDArray[Any],
        user_embedding: npt.NDArray[Any] | None,
    ) -> FloatArray:
        """history, history_weight: [n, L] (tokens, 0 pads); items: [n] indexes; user
        embedding: [n, d] or [d] (one user for all rows), None when unavailable (→ 0)."""
        items = np.asarray(items, dtype=np.int64)
        present = np.asarray(history) > 0
        weight = np.where(present, np.asarray(history_weight, dtype=np.float32), 0.0)
        total = np.maximum(weight.sum(axis=1), 1e-6)
        columns = []
        for table in (self._itemcf, self._swing):
            pair = table.lookup(
                np.asarray(history, np.int64) - 1, np.broadcast_to(items[:, None], history.shape)
            )
            pair = np.where(present, pair, 0.0)
            columns.append((pair * weight).sum(axis=1) / total)
            columns.append(pair.max(axis=1, initial=0.0))
        return self._finish(columns, items, user_embedding)

    def compute_one_user(
        self,
        history: npt.NDArray[Any],
        history_weight: npt.NDArray[Any],
        items: npt.NDArray[Any],
        user_embedding: npt.NDArray[Any] | None,
    ) -> FloatArray:
        """`compute` when every row shares one history (history, history_weight: [L] or
        [m, L] with identical rows, the first is used), with the same values: the pair
        scores come from `PairScores.lookup_history`, and the sums run over the same [n, L]
        layout in the same order."""
        items = np.asarray(items, dtype=np.int64)
        tokens = np.asarray(history, dtype=np.int64).reshape(-1, np.shape(history)[-1])[0]
        weights = np.asarray(history_weight, dtype=np.float32).reshape(-1, tokens.shape[0])[0]
        present = tokens > 0
        weight = np.where(present, weights, 0.0)[None, :]
        total = np.maximum(weight.sum(axis=1), 1e-6)
        columns = []
        for table in (self._itemcf, self._swing):
            pair = table.lookup_history(tokens - 1, items)
            columns.append((pair * weight).sum(axis=1) / total)
            columns.append(pair.max(axis=1, initial=0.0))
        return self._finish(columns, items, user_embedding)

    def _finish(
        self, columns: list[npt.NDArray[Any]], items: Int64Array, user_embedding: npt.NDArray[Any] | None
    ) -> FloatArray:
        """The two-tower column, then the columns stacked and compressed."""
        known = (items >= 0) & (items < self._embeddings.shape[0])
        if user_embedding is None or self._embeddings.shape[0] == 0:
            columns.append(np.zeros(items.shape[0], np.float32))
        else:
            vectors = self._embeddings[np.where(known, items, 0)]
            user = np.asarray(user_embedding, dtype=np.float32)
            dots = vectors @ user if user.ndim == 1 else np.einsum("nd,nd->n", vectors, user)
            columns.append(np.where(known, dots, 0.0))
        # Swing sums are unbounded: compress them like counts.
        features = np.stack(columns, axis=1).astype(np.float32)
        features[:, 2:4] = np.log1p(features[:, 2:4])
        return features


def tower_inputs(user: Inputs) -> Inputs:
    """The user tower's inputs out of a user's full inputs."""
    return {name: user[name] for name in ("user_id", "region", "history", "history_weight")}


def ranker_inputs(user: Inputs, items: Inputs) -> Inputs:
    """Broadcast one user's inputs (batch of one) against n candidate items."""
    n = items["item_id"].shape[0]
    batch = {name: np.repeat(value, n, axis=0) for name, value in user.items()}
    batch.update(items)
    return batch
