"""The item cold-start evaluation: how well each method places items no model was trained on.

A version is built without the new items (on Book-Crossing: `BX-Ratings` trains it, the
disjoint `BX-NewBooks*` set is held out whole). The new items are then given by their
metadata only, as `UpsertItems` gives them (`CatalogueItem`), and for every user who rated
new items each method ranks the **new items alone**; recall@50 and NDCG@10 of that ranking
against the user's new-item ratings, mean over users:

- `random`: a seeded random order (the floor);
- `popular_by_author`: new items scored by the popularity of their author in the version's
  training data (an author it does not know scores 0; ties in random order);
- `content_tower`: cosine of the user's two-tower embedding with the new item's item-tower
  embedding computed from its metadata alone (item id token 0: the tower never saw it), both
  from the exported ONNX towers, as serving would compute them;
- `look_alike`: `recsys.stages.sources.LookAlikeSource` (the served channel's code) after
  replaying a seeded `replay_fraction` of the new-item events: each replayed event makes its
  user an engager of its item. Replayed events are excluded from scoring (neither ranked nor
  relevant); their users' other new-item events still count. Items nobody engaged with have
  no vector and are not ranked by it;
- `merge`: weighted reciprocal-rank fusion of content, look-alike and author, its weights
  chosen on a seeded validation share of the users; every method is reported on the others.

TF-free: it runs on a `ServingModel` and the exported item tower, inside `recsys build` and on
a stored version alike.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from recsys.artifacts import FloatArray, IntArray
from recsys.catalogue import VersionVocabulary
from recsys.content import ContentEmbedder
from recsys.evaluation.metrics import mean_metrics
from recsys.feature_store import CatalogueItem
from recsys.onnx_models import OnnxModel
from recsys.serving_model import ServingModel
from recsys.stages.sources import LOOK_ALIKE_ENGAGERS, LookAlikeSource, look_alike_vectors, unit_rows

METHODS: Final = ("random", "popular_by_author", "content_tower", "look_alike", "merge")
MERGED: Final = ("content_tower", "look_alike", "popular_by_author")
RECALL_AT: Final = 50
LIST_LENGTH: Final = 200  # per method and user: what the merge fuses (the metrics read the top 50)
RRF_OFFSET: Final = 60.0  # reciprocal-rank fusion's constant (Cormack et al. 2009)
MERGE_GRID: Final = (0.0, 0.25, 0.5, 1.0, 2.0)
USER_BATCH: Final = 1024


@dataclass(frozen=True)
class ColdStartSet:
    """The new items (metadata only) and the events on them: event `e` is user
    `event_users[e]` on item `items[event_items[e]]`."""

    items: tuple[CatalogueItem, ...]
    event_users: tuple[str, ...]
    event_items: IntArray

    def __post_init__(self) -> None:
        if len(self.event_users) != self.event_items.shape[0]:
            raise ValueError(
                f"event_items: {self.event_items.shape[0]} entries for {len(self.event_users)} event users"
            )
        if self.event_items.shape[0] and (
            self.event_items.min() < 0 or self.event_items.max() >= len(self.items)
        ):
            raise ValueError(f"event_items: positions must be in [0, {len(self.items)})")


def content_embeddings(
    model: ServingModel, item_tower: OnnxModel, items: Sequence[CatalogueItem]
) -> FloatArray:
    """Item-tower embeddings of new items from their metadata only (item id token 0), unit
    length: `recsys.content.ContentEmbedder`, what the two_tower channel serves new items with.
    A version trained with content inputs (publisher, year, title tokens, item-id dropout)
    gets them; an older one embeds from the categories and author alone."""
    return unit_rows(ContentEmbedder(model.spec, model.core.catalogue, item_tower).embed(items))


def user_embeddings(model: ServingModel, user_ids: Sequence[str]) -> FloatArray:
    """The user tower's embedding of each user from the version's data (a user it does not
    know: user token 0 and no history, the tower's cold-start vector)."""
    rows: list[FloatArray] = []
    for start in range(0, len(user_ids), USER_BATCH):
        inputs = []
        for user_id in user_ids[start : start + USER_BATCH]:
            index = model.user_lookup.get(user_id, -1)
            if index >= 0:
                inputs.append(model.user_inputs(model.query(index)))
            else:
                inputs.append(model.user_features.inputs(-1, np.zeros(0, np.int64), np.zeros(0, bool)))
        rows.append(model.user_embeddings(inputs))
    if not rows:
        return np.zeros((0, int(model.item_embeddings.shape[1])), np.float32)
    return np.concatenate(rows).astype(np.float32)


def author_popularity(model: ServingModel, items: Sequence[CatalogueItem]) -> FloatArray:
    """Each new item's author's interaction count in the version's training history (0 for
    an author the version does not know)."""
    catalogue = model.core.catalogue
    vocabulary = VersionVocabulary.of(catalogue)
    history = np.asarray(model.core.history.items.values, dtype=np.int64)
    authors = np.asarray(catalogue.authors, dtype=np.int64)
    counts = np.bincount(authors[history], minlength=int(catalogue.author_vocab.shape[0]) + 1).astype(
        np.float32
    )
    counts[0] = 0.0  # token 0 is "no author": not an author's popularity
    tokens = np.asarray(
        [vocabulary.authors.get(item.author.strip().casefold(), 0) for item in items], np.int64
    )
    return counts[tokens]


def _top(scores: npt.NDArray[Any], allowed: npt.NDArray[np.bool_], length: int) -> IntArray:
    """Positions of the best `length` allowed scores, best first."""
    candidates = np.flatnonzero(allowed)
    if candidates.shape[0] > length:
        best = np.argpartition(-scores[candidates], length - 1)[:length]
        candidates = candidates[best]
    order = np.argsort(-scores[candidates], kind="stable")
    return candidates[order].astype(np.int32)


def rank_fusion(lists: Sequence[IntArray], weights: Sequence[float], n_items: int, length: int) -> IntArray:
    """Weighted reciprocal-rank fusion: an item scores Σ weight / (60 + rank) over the lists
    it is in (rank 1 first); the best `length`, best first (ties by position)."""
    scores = np.zeros(n_items, np.float64)
    for ranked, weight in zip(lists, weights, strict=True):
        if weight > 0 and ranked.shape[0]:
            scores[ranked] += weight / (RRF_OFFSET + np.arange(1, ranked.shape[0] + 1))
    return _top(scores, scores > 0, length)


@dataclass
class _Prepared:
    """Everything the methods read, computed once."""

    n_items: int
    users: list[int]  # rows of `embeddings`, the users scored
    relevant: list[IntArray]  # per scored user: new-item positions of their scored events
    replayed: list[IntArray]  # per scored user: positions of their replayed events (excluded)
    embeddings: FloatArray  # unit user embeddings by user row
    content: FloatArray  # unit item-tower embeddings by new-item position
    author: FloatArray  # author popularity by new-item position
    look_alike: LookAlikeSource
    engaged_items: int
    replayed_events: int


def _lists(
    prepared: _Prepared, position: int, model: ServingModel, rng: np.random.Generator
) -> dict[str, IntArray]:
    """One scored user's ranked list per single method (new-item positions, best first)."""
    n = prepared.n_items
    allowed = np.ones(n, dtype=bool)
    replayed = prepared.replayed[position]
    allowed[replayed] = False
    user = prepared.users[position]
    embedding = prepared.embeddings[user]
    lists = {
        "random": _top(rng.random(n), allowed, LIST_LENGTH),
        # Integer counts plus a jitter below 1: the count decides, ties fall in random order.
        "popular_by_author": _top(prepared.author + 0.5 * rng.random(n), allowed, LIST_LENGTH),
        "content_tower": _top(prepared.content @ embedding, allowed, LIST_LENGTH),
    }
    base = model.core.catalogue.n_items  # the source works in dense indexes, as served
    query = dataclasses.replace(
        model.query(-1), embedding=embedding, excluded=np.unique((replayed + base).astype(np.int32))
    )
    lists["look_alike"] = prepared.look_alike.candidates(query, LIST_LENGTH).items - base
    return lists


def _merged(lists: Sequence[Mapping[str, IntArray]], weights: Sequence[float], n: int) -> list[IntArray]:
    return [rank_fusion([row[name] for name in MERGED], weights, n, LIST_LENGTH) for row in lists]


def evaluate_item_cold_start(
    model: ServingModel,
    item_tower: OnnxModel,
    new: ColdStartSet,
    *,
    seed: int = 0,
    replay_fraction: float = 0.1,
    validation_fraction: float = 0.25,
    engagers: int = LOOK_ALIKE_ENGAGERS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The figures (see the module docstring): per method recall@50 and NDCG@10 (hit
    rate@50 too) over the new items, mean over the test users, and what they were measured on."""
    if not 0 < replay_fraction < 1:
        raise ValueError(f"replay_fraction: expected in (0, 1), got {replay_fraction}")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction: expected in (0, 1), got {validation_fraction}")
    rng = np.random.default_rng(seed)
    n = len(new.items)
    known = np.asarray([item.item_id in model.item_lookup for item in new.items], dtype=bool)
    if known.any():
        raise ValueError(f"new: {int(known.sum())} items are already in version {model.version}")

    user_ids = sorted(set(new.event_users))
    row_of = {user: row for row, user in enumerate(user_ids)}
    event_rows = np.asarray([row_of[user] for user in new.event_users], dtype=np.int64)
    event_items = np.asarray(new.event_items, dtype=np.int64)
    order = rng.permutation(event_rows.shape[0])  # the replay order, too (no timestamps)
    n_replayed = round(replay_fraction * event_rows.shape[0])
    replayed = np.zeros(event_rows.shape[0], dtype=bool)
    replayed[order[:n_replayed]] = True

    if progress is not None:
        progress(f"embed {len(user_ids):,} users and {n:,} new items")
    embeddings = unit_rows(user_embeddings(model, user_ids))
    content = content_embeddings(model, item_tower, new.items)

    # The replay: events in the permuted order, each making its user an engager of its item.
    engagers_of: list[list[int]] = [[] for _ in range(n)]
    for event in order[:n_replayed].tolist():
        engagers_of[int(event_items[event])].append(int(event_rows[event]))
    vectors, counts = look_alike_vectors(engagers_of, embeddings, engagers)
    base = model.core.catalogue.n_items
    look_alike = LookAlikeSource(np.arange(n, dtype=np.int32) + np.int32(base), vectors)

    scored_by_user: dict[int, list[int]] = {}
    replayed_by_user: dict[int, list[int]] = {}
    for row, item, was_replayed in zip(
        event_rows.tolist(), event_items.tolist(), replayed.tolist(), strict=True
    ):
        (replayed_by_user if was_replayed else scored_by_user).setdefault(row, []).append(item)
    users = sorted(scored_by_user)
    prepared = _Prepared(
        n_items=n,
        users=users,
        relevant=[np.unique(np.asarray(scored_by_user[user], np.int32)) for user in users],
        replayed=[np.unique(np.asarray(replayed_by_user.get(user, []), np.int32)) for user in users],
        embeddings=embeddings,
        content=content,
        author=author_popularity(model, new.items),
        look_alike=look_alike,
        engaged_items=int((counts > 0).sum()),
        replayed_events=n_replayed,
    )
    if progress is not None:
        progress(f"rank the new items for {len(users):,} users")
    lists = [_lists(prepared, position, model, rng) for position in range(len(users))]
    validation = np.zeros(len(users), dtype=bool)
    validation[rng.permutation(len(users))[: round(validation_fraction * len(users))]] = True
    test = np.flatnonzero(~validation)
    valid = np.flatnonzero(validation)

    def recall(rows: npt.NDArray[np.intp], ranked: Sequence[IntArray]) -> float:
        return mean_metrics(ranked, [prepared.relevant[row] for row in rows], (RECALL_AT,))[
            f"recall@{RECALL_AT}"
        ]

    # The merge's weights: the best validation recall@50 over the grid (the first best wins).
    best_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    best_recall = -1.0
    validation_lists = [lists[row] for row in valid]
    for weights in itertools.product(MERGE_GRID, repeat=len(MERGED)):
        if not any(weights):
            continue
        value = recall(valid, _merged(validation_lists, weights, n))
        if value > best_recall:
            best_weights, best_recall = weights, value

    test_relevant = [prepared.relevant[row] for row in test]
    results: dict[str, dict[str, float]] = {}
    for method in METHODS:
        if method == "merge":
            ranked = _merged([lists[row] for row in test], best_weights, n)
        else:
            ranked = [lists[row][method] for row in test]
        values = mean_metrics(ranked, test_relevant, (RECALL_AT,))
        results[method] = {key: round(value, 5) for key, value in values.items()}
    users_engaged = {int(row) for row in event_rows[replayed].tolist()}
    return {
        "methods": results,
        "users": int(test.shape[0]),
        "validation_users": int(valid.shape[0]),
        "new_items": n,
        "events": int(event_rows.shape[0]),
        "replayed_events": n_replayed,
        "replay_fraction": replay_fraction,
        "items_with_look_alike_vector": prepared.engaged_items,
        "users_known_to_version": int(sum(user_ids[user] in model.user_lookup for user in users)),
        "replaying_users": len(users_engaged),
        "engagers_per_item": engagers,
        "merge": {
            "fusion": "weighted reciprocal rank (60 + rank)",
            "weights": dict(zip(MERGED, best_weights, strict=True)),
            "validation_recall@50": round(best_recall, 5),
        },
        "seed": seed,
        "relevant": "every rating of a new item by the user (not replayed)",
        "ranking": "among the new items only",
        # Test users for whom look-alike ranks nothing (no engaged item is allowed to them).
        "look_alike_empty_users": int(sum(lists[row]["look_alike"].shape[0] == 0 for row in test)),
    }


COLD_START_SET: Final = "eval/cold_start.json"  # in a version: the set its figures came from
SEEDS: Final = 3


def cold_start_set_to_json(new: ColdStartSet) -> dict[str, Any]:
    """What a version stores so that `recsys evaluate` repeats the figures without the data."""
    return {
        "items": [{"item_id": item.item_id, **json.loads(item.to_json(0.0))} for item in new.items],
        "event_users": list(new.event_users),
        "event_items": new.event_items.tolist(),
    }


def cold_start_set_from_json(data: Mapping[str, Any]) -> ColdStartSet:
    items = tuple(
        CatalogueItem.from_json(str(entry["item_id"]), json.dumps(entry))[0] for entry in data["items"]
    )
    return ColdStartSet(
        items,
        tuple(str(user) for user in data["event_users"]),
        np.asarray(data["event_items"], dtype=np.int32),
    )


def evaluate_item_cold_start_seeds(
    model: ServingModel,
    item_tower: OnnxModel,
    new: ColdStartSet,
    *,
    seed: int = 0,
    seeds: int = SEEDS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`evaluate_item_cold_start` with `seeds` replay/split seeds (seed, seed + 1, …) on the
    one version: per method and metric the mean and the standard deviation over them, and
    each run."""
    runs = [
        evaluate_item_cold_start(model, item_tower, new, seed=seed + offset, progress=progress)
        for offset in range(seeds)
    ]
    methods: dict[str, dict[str, float]] = {}
    for method in METHODS:
        summary: dict[str, float] = {}
        for metric in runs[0]["methods"][method]:
            values = np.asarray([run["methods"][method][metric] for run in runs], dtype=np.float64)
            summary[metric] = round(float(values.mean()), 5)
            summary[f"{metric}_std"] = round(float(values.std()), 5)
        methods[method] = summary
    return {
        "methods": methods,
        "seeds": [seed + offset for offset in range(seeds)],
        "users": [run["users"] for run in runs],
        "new_items": len(new.items),
        "events": runs[0]["events"],
        "replay_fraction": runs[0]["replay_fraction"],
        "runs": runs,
    }
