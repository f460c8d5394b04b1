"""Training rows for the towers and the ranker.

A tower row's user features use only what the user did *before* that interaction (its
history window), as the services will see it, built vectorised. The ranker's rows are
recall's own candidates for each user at the fit/validation boundary (`candidate_rows`),
assembled by the serving code, plus a few unconsumed items drawn by popularity."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from recsys.artifacts import Int64Array, IntArray
from recsys.features import FeatureSpec, Inputs, Provenance, history_matrix
from recsys.serving_model import ServingModel
from recsys.stages.merge import MergedCandidates
from recsys.stages.query import UserQuery
from training.encode import Interactions


class Column(Protocol):
    """A column of training rows as the training loops read it: one batch of rows at a time
    (`column[rows]`), so a column may be gathered on demand instead of held whole."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, rows: Any, /) -> npt.NDArray[Any]: ...


RowInputs = Mapping[str, Column]


@dataclass(frozen=True)
class HistoryColumn:
    """The `history` (tokens) or `history_weight` input of each row, gathered for the rows asked
    for: row r's window is `sequence[row_start[r]:row_end[r]]`. Held as [n, L] matrices these
    inputs took 1.2 GB each at 5M rows (L 30), and building them several times that."""

    spec: FeatureSpec
    item_sequence: IntArray
    liked_sequence: npt.NDArray[np.bool_]
    row_start: Int64Array
    row_end: Int64Array
    weights: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.row_start.shape[0], self.spec.history_length)

    def __getitem__(self, rows: Any, /) -> npt.NDArray[Any]:
        tokens, weights = history_matrix(
            self.spec, self.item_sequence, self.liked_sequence, self.row_start[rows], self.row_end[rows]
        )
        return weights if self.weights else tokens

    def select(self, mask: npt.NDArray[np.bool_]) -> HistoryColumn:
        return HistoryColumn(
            self.spec,
            self.item_sequence,
            self.liked_sequence,
            self.row_start[mask],
            self.row_end[mask],
            self.weights,
        )


@dataclass(frozen=True)
class GatheredColumn:
    """Per-row inputs looked up by key when a batch asks (`lookup(keys[rows])[name]`): an
    item's features for each interaction, without a copy per interaction."""

    lookup: Callable[[npt.NDArray[Any]], Mapping[str, npt.NDArray[Any]]]
    keys: npt.NDArray[Any]
    name: str
    width: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.keys.shape[0], *self.width)

    def __getitem__(self, rows: Any, /) -> npt.NDArray[Any]:
        return self.lookup(self.keys[rows])[self.name]


def gathered(
    lookup: Callable[[npt.NDArray[Any]], Mapping[str, npt.NDArray[Any]]], keys: npt.NDArray[Any]
) -> dict[str, Column]:
    """Every input `lookup` returns, as columns over `keys` gathered per batch."""
    probe = lookup(keys[:1])
    return {name: GatheredColumn(lookup, keys, name, tuple(value.shape[1:])) for name, value in probe.items()}


@dataclass(frozen=True)
class SequenceRows:
    """Interactions sorted by (user, time), each with its history window."""

    order: Int64Array  # row indexes into the part, sorted
    user: IntArray
    item: IntArray
    liked: npt.NDArray[np.bool_]
    history: HistoryColumn  # [n, L] tokens, most recent first, gathered per batch
    history_weight: HistoryColumn


def sequence_rows(part: Interactions, spec: FeatureSpec) -> SequenceRows:
    rows = np.arange(len(part))
    order = np.lexsort((rows, part.time, part.user)).astype(np.int64)
    user = part.user[order]
    item = part.item[order]
    liked = part.liked[order]
    first = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    row_start = np.repeat(first, np.diff(np.r_[first, user.shape[0]])).astype(np.int64)
    row_end = np.arange(user.shape[0], dtype=np.int64)  # history: strictly before this row
    history = HistoryColumn(spec, item, liked, row_start, row_end)
    return SequenceRows(order, user, item, liked, history, dataclasses.replace(history, weights=True))


def user_rows(
    rows: SequenceRows,
    regions: IntArray,
    user_stats: npt.NDArray[np.float32],
) -> dict[str, Column]:
    return {
        "user_id": (rows.user.astype(np.int64) + 1),
        "region": np.asarray(regions, dtype=np.int64)[rows.user],
        "history": rows.history,
        "history_weight": rows.history_weight,
        "user_stats": np.asarray(user_stats, dtype=np.float32)[rows.user],
    }


class NegativeSampler:
    """Popularity-proportional (count^exponent) sampling of items a user never consumed."""

    def __init__(
        self,
        consumed_user: IntArray,
        consumed_item: IntArray,
        n_items: int,
        seed: int,
        exponent: float,
        popularity_items: IntArray | None = None,
    ) -> None:
        """`popularity_items` (default: the consumed items) are the interactions whose counts
        define popularity; the consumed pairs are never drawn."""
        popular = consumed_item if popularity_items is None else popularity_items
        counts = np.bincount(popular, minlength=n_items).astype(np.float64)
        weights = np.power(counts, exponent) + 1e-3  # every item can be drawn, popular ones more often
        self._cdf = np.cumsum(weights / weights.sum())
        self._n_items = n_items
        self._consumed = np.unique(consumed_user.astype(np.int64) * n_items + consumed_item)
        self._rng = np.random.default_rng(seed)

    def _draw(self, n: int) -> Int64Array:
        picks = np.searchsorted(self._cdf, self._rng.random(n), side="right")
        return np.minimum(picks, self._n_items - 1).astype(np.int64)

    def sample(self, users: IntArray, per_user_row: int) -> tuple[Int64Array, Int64Array]:
        """For each entry of `users`, `per_user_row` unconsumed items. Returns (row index
        into `users`, item); the rare rows whose draws all collide are fewer."""
        rows = np.repeat(np.arange(users.shape[0], dtype=np.int64), per_user_row)
        items = self._draw(rows.shape[0])
        for _ in range(3):
            bad = self._is_consumed(users[rows].astype(np.int64), items)
            if not bad.any():
                break
            items[bad] = self._draw(int(bad.sum()))
        keep = ~self._is_consumed(users[rows].astype(np.int64), items)
        return rows[keep], items[keep]

    def _is_consumed(self, users: Int64Array, items: Int64Array) -> npt.NDArray[np.bool_]:
        keys = users * self._n_items + items
        position = np.searchsorted(self._consumed, keys)
        position[position == self._consumed.shape[0]] = 0
        return np.asarray(self._consumed[position] == keys)


def select(rows: SequenceRows, mask: npt.NDArray[np.bool_]) -> SequenceRows:
    return SequenceRows(
        rows.order[mask],
        rows.user[mask],
        rows.item[mask],
        rows.liked[mask],
        rows.history.select(mask),
        rows.history_weight.select(mask),
    )


@dataclass(frozen=True)
class CandidateRows:
    """Ranker training rows from recall's own candidates: one list per user, rows of a user
    contiguous (`group` numbers the lists, for the list-wise loss)."""

    inputs: Inputs
    labels: dict[str, npt.NDArray[np.bool_]]
    group: Int64Array
    user: Int64Array  # each row's user index
    item: Int64Array  # each row's item index
    from_recall: npt.NDArray[np.bool_]  # the row is one of recall's candidates (else random)
    users: int  # lists kept (users with at least one positive among their candidates)
    candidates: int  # candidates seen before negatives were subsampled


def candidate_rows(
    model: ServingModel,
    queries: Sequence[UserQuery],
    histories: Sequence[tuple[IntArray, npt.NDArray[np.bool_]]],
    merged: Sequence[MergedCandidates],
    later: Interactions,
    sampler: NegativeSampler,
    *,
    max_negatives: int,
    random_negatives: int,
    seed: int,
) -> CandidateRows:
    """For each user, the merged candidates recall produced from the fit period (`merged[i]`
    for `queries[i]`, with `histories[i]` the user's stored history): positives are the
    candidates consumed in the `later` period, negatives the other candidates (at most
    `max_negatives`, a seeded sample) plus `random_negatives` popularity-sampled unconsumed
    items recall did not return (provenance absent), so the ranker still orders an item that
    reaches it another way. Users without a positive among their candidates are left out:
    their list teaches the list-wise loss nothing. The inputs are `ServingModel.ranker_batch`,
    the assembly the services score with. No interaction after `later` is read."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((later.item, later.user))
    users, items, liked = later.user[order], later.item[order], later.liked[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], users.shape[0]]
    span = {int(users[s]): (int(s), int(e)) for s, e in zip(starts, ends, strict=True)}
    extra_rows, extra_items = sampler.sample(
        np.asarray([query.user_index for query in queries], dtype=np.int64), random_negatives
    )
    extra_by_position = np.split(extra_items, np.searchsorted(extra_rows, np.arange(1, len(queries))))
    parts: list[Inputs] = []
    clicks: list[npt.NDArray[np.bool_]] = []
    likes: list[npt.NDArray[np.bool_]] = []
    row_users: list[Int64Array] = []
    items_of_rows: list[Int64Array] = []
    from_recall: list[npt.NDArray[np.bool_]] = []
    seen = 0
    for position, (query, (history_items, history_liked), candidates) in enumerate(
        zip(queries, histories, merged, strict=True)
    ):
        if query.user_index not in span or len(candidates) == 0:
            continue
        start, end = span[query.user_index]
        seen += len(candidates)
        click = np.isin(candidates.items, items[start:end])
        if not click.any():
            continue
        negatives = np.flatnonzero(~click)
        if negatives.shape[0] > max_negatives:
            negatives = np.sort(rng.choice(negatives, size=max_negatives, replace=False))
        keep = np.sort(np.concatenate([np.flatnonzero(click), negatives]))
        chosen = candidates.take(keep)
        provenance = chosen.provenance()
        extra = extra_by_position[position]
        extra = extra[~np.isin(extra, candidates.items)]
        row_items = np.concatenate([chosen.items.astype(np.int64), extra.astype(np.int64)])
        provenance = Provenance(
            provenance.channel_names,
            np.vstack([provenance.ranks, np.full((extra.shape[0], provenance.ranks.shape[1]), -1, np.int16)]),
            np.vstack(
                [provenance.scores, np.zeros((extra.shape[0], provenance.scores.shape[1]), np.float32)]
            ),
            np.concatenate([provenance.merge_scores, np.zeros(extra.shape[0], np.float32)]),
        )
        user = model.user_inputs(query, history_items, history_liked)
        parts.append(model.ranker_batch(user, row_items, query.embedding, provenance))
        user_liked = items[start:end][liked[start:end]]
        clicks.append(np.isin(row_items, items[start:end]))
        likes.append(np.isin(row_items, user_liked))
        row_users.append(np.full(row_items.shape[0], query.user_index, np.int64))
        items_of_rows.append(row_items)
        from_recall.append(np.arange(row_items.shape[0]) < chosen.items.shape[0])
    if not parts:
        raise ValueError("no user has a positive among recall's candidates: nothing to train the ranker on")
    sizes = np.asarray([part["item_id"].shape[0] for part in parts])
    inputs = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    group = np.repeat(np.arange(len(parts), dtype=np.int64), sizes)
    labels = {"click": np.concatenate(clicks), "like": np.concatenate(likes)}
    return CandidateRows(
        inputs,
        labels,
        group,
        np.concatenate(row_users),
        np.concatenate(items_of_rows),
        np.concatenate(from_recall),
        len(parts),
        seen,
    )
