"""Item-to-item recall indices: weighted-cosine ItemCF and Swing, as `NeighborTable`s.

Both builders take training interactions as dense index arrays (`user_index[n]`, `item_index[n]`, no
repeated (user, item) pair) and keep, for every item, its `top_k` most similar other items.

- **ItemCF** (weighted cosine, as in Wang Shusen's recommender-systems course): with `like(u, i) > 0` the
  weight of an interaction (the caller derives it from ratings, e.g. `1 + liked`),
  `sim(i, j) = Σ_u like(u, i)·like(u, j) / (‖like(·, i)‖₂ · ‖like(·, j)‖₂)`. Computed as `Xᵀ X` with X the
  users × items CSR matrix of like weights with unit-length columns, one block of item rows at a time
  (blocks sized by their number of multiply-adds), keeping only each row's top k, so memory stays bounded
  and no items × items matrix ever exists.
- **Swing** (Yang et al., "Large Scale Product Graph Construction for Recommendation in E-commerce"):
  `sim(i, j) = Σ over unordered pairs {u, v}, u ≠ v, of users who both consumed i and j of
  1 / (α + |I_u ∩ I_v|)`. Pairs of users who share little besides i and j count most, so Swing is less
  fooled than cosine by big, undiscriminating audiences. Computed one item at a time: with S the binary
  matrix of the histories of i's users (restricted to items at least two of them share, the only ones a
  pair can have in common), O = S Sᵀ the pairwise overlaps, P = 1 / (α + O) with a zero diagonal,
  `sim(i, ·) = ½ · colsum(S ⊙ (P S))` with dense products when S is dense (MovieLens), or, when few
  users share each item (large sparse catalogues), the same sums by enumerating the pairs of users of
  every shared item, which costs Σ_j |U_i ∩ U_j|² instead of |U_i|² · (shared items).

Caps. Every user contributes |I_u|² item pairs to ItemCF, and every item |U_i|² user pairs to Swing, so
a few very heavy users (crawlers, resellers, test accounts) or very popular items would dominate the
build time. With a cap set to None the result is exact; the defaults trade a little signal for bounded
cost:

- `max_items_per_user` (both; default 1000): a user with more interactions keeps only the latest
  `max_items_per_user` by `order` (larger is more recent; the larger item index on ties), or without
  `order` a seeded pseudo-random sample (the items with the largest `member_hash(seed, user, item)`,
  which Spark computes identically: training/spark_cf.py). It bounds a user's ItemCF cost at 10⁶ pairs.
  What is lost is the older history of the heaviest users (on the synthetic benchmark of
  loadtest/bench_cf_build.py: 0.2 % of the users, 4 % of the interactions, and 70 % of ItemCF's
  multiply-adds), whose co-occurrences are the weakest evidence anyway: a user who consumed everything
  says little about what goes together. ItemCF's norms and Swing's overlaps are computed on the capped
  histories. MovieLens-100K (at most 737 ratings a user) is unaffected.
- `max_users_per_item` (Swing; default 200): an item with a bigger audience is computed from a
  pseudo-random sample of `max_users_per_item` of its users (the largest `member_hash(seed, item,
  user)`), bounding an item's cost at
  19,900 user pairs and its memory at a 200 × 200 overlap matrix. What is lost: a popular item's
  neighbours rest on a sample of its users (on the synthetic benchmark 0.5 % of the items, holding half
  the interactions; 117 of MovieLens-100K's 1,682 items), enough to rank them, and its scores are
  smaller than they would be (compare scores within a row, not across rows). Sampling follows the
  per-user cap and is per item, so Swing is then not exactly symmetric. With None, an item with m users
  needs m² memory: fine for small data, not for an item of 10⁵ users.

Ordering: neighbours are ranked by their float32 score, ties by the smaller item index, so a build is
deterministic for given inputs and seed.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator

import numpy as np
import scipy.sparse as sp

from recsys.neighbors import PAD, NeighborTable
from recsys.validation import check_index, describe

Progress = Callable[[int, int], None]
"""Called as `progress(done, total)` in items: after each block of rows (ItemCF), every 0.5 % (Swing)."""

DEFAULT_TOP_K = 100
ITEMCF_MAX_ITEMS_PER_USER = 1000
SWING_MAX_ITEMS_PER_USER = 1000
SWING_MAX_USERS_PER_ITEM = 200

# ItemCF multiplies one block of item rows at a time; a block holds at most this many multiply-adds, so
# at most this many candidate pairs, each ~50 bytes while it is ranked (~0.5 GB per block).
_BLOCK_PRODUCTS = 10_000_000
# Rows with more candidates than this (and than k) are cut with a partial sort, one row at a time; the
# shorter ones are ranked together with one sort (cheaper per row, dearer per candidate).
_LONG_ROW = 256
_PROGRESS_STEPS = 200
# Swing computes an item either pair by pair (one numpy step per pair of its users and item they share)
# or with dense products (members² × shared items multiply-adds, twice). Timed on MovieLens-100K and the
# synthetic benchmark, a step costs as much as ~450 multiply-adds and the fastest cut-off was 100-200;
# the cheaper way by this estimate is taken. Both are exact.
_PAIR_COST_IN_PRODUCTS = 200


# --- public API --------------------------------------------------------------------------------------
def build_itemcf(
    user_index: np.ndarray,
    item_index: np.ndarray,
    like_weight: np.ndarray,
    n_users: int,
    n_items: int,
    *,
    top_k: int = DEFAULT_TOP_K,
    max_items_per_user: int | None = ITEMCF_MAX_ITEMS_PER_USER,
    order: np.ndarray | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> NeighborTable:
    """The weighted-cosine ItemCF table: the `top_k` most similar items of every item.

    `like_weight[n]` (> 0) weighs each interaction; `order[n]` (optional, larger is more recent) decides
    which interactions a user over `max_items_per_user` keeps (the latest; a sample seeded by `seed`
    without it). Items without interactions get an all-padding row.
    """
    users, items = _check_interactions(user_index, item_index, n_users, n_items)
    weights = _check_like_weight(like_weight, users.size)
    recency = _check_order(order, users.size)
    _check_top_k(top_k)
    _check_cap("max_items_per_user", max_items_per_user)

    keep = _keep_per_group(users, items, n_users, max_items_per_user, recency, seed)
    users, items, weights = users[keep], items[keep], weights[keep]

    # Unit-length columns make Xᵀ X the cosine; every item with a row in X has a positive norm.
    norms = np.sqrt(np.bincount(items, weights=weights * weights, minlength=n_items))
    ratings = _csr(users, items, weights / norms[items], n_users, n_items, "user_index", "item_index")
    audiences = ratings.T.tocsr()  # items × users, indices sorted

    history_lengths = np.diff(ratings.indptr)
    row_products = np.bincount(items, weights=history_lengths[users], minlength=n_items)

    neighbors = np.full((n_items, top_k), PAD, dtype=np.int32)
    scores = np.zeros((n_items, top_k), dtype=np.float32)
    for start, stop in _blocks(row_products, _BLOCK_PRODUCTS):
        block = (audiences[start:stop] @ ratings).tocsr()
        block.sort_indices()
        rows = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(block.indptr))
        columns = block.indices
        similar = columns != rows + start
        _select_top_k(
            rows[similar],
            columns[similar],
            block.data[similar],
            neighbors[start:stop],
            scores[start:stop],
        )
        if progress is not None:
            progress(stop, n_items)
    return NeighborTable(neighbors, scores)


def build_swing(
    user_index: np.ndarray,
    item_index: np.ndarray,
    n_users: int,
    n_items: int,
    *,
    top_k: int = DEFAULT_TOP_K,
    alpha: float = 1.0,
    max_users_per_item: int | None = SWING_MAX_USERS_PER_ITEM,
    max_items_per_user: int | None = SWING_MAX_ITEMS_PER_USER,
    order: np.ndarray | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> NeighborTable:
    """The Swing table: the `top_k` most similar items of every item.

    `alpha` (≥ 0) smooths the pair weight 1 / (α + overlap). Users over `max_items_per_user` keep their
    latest interactions by `order` (a sample seeded by `seed` without it); items over `max_users_per_item`
    are computed from a sample of that many of their users (seeded by `seed`).
    """
    users, items = _check_interactions(user_index, item_index, n_users, n_items)
    recency = _check_order(order, users.size)
    _check_top_k(top_k)
    if not (isinstance(alpha, int | float) and np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha: expected a finite number >= 0, got {alpha!r}")
    _check_cap("max_items_per_user", max_items_per_user)
    _check_cap("max_users_per_item", max_users_per_item)

    keep = _keep_per_group(users, items, n_users, max_items_per_user, recency, seed)
    users, items = users[keep], items[keep]
    ones = np.ones(users.size, dtype=np.float32)
    histories = _csr(users, items, ones, n_users, n_items, "user_index", "item_index")
    sampled = _keep_per_group(items, users, n_items, max_users_per_item, None, seed)
    audiences = _csr(
        items[sampled], users[sampled], ones[sampled], n_items, n_users, "item_index", "user_index"
    )

    neighbors = np.full((n_items, top_k), PAD, dtype=np.int32)
    scores = np.zeros((n_items, top_k), dtype=np.float32)
    audience_sizes = np.diff(audiences.indptr)
    report_every = max(1, n_items // _PROGRESS_STEPS)
    with _one_blas_thread():
        for item in range(n_items):
            if audience_sizes[item] >= 2:
                members = audiences.indices[audiences.indptr[item] : audiences.indptr[item + 1]]
                columns, values = _swing_row(item, members, histories.indptr, histories.indices, float(alpha))
                best_columns, best_values = _top_k_row(columns, values.astype(np.float32), top_k)
                neighbors[item, : best_columns.size] = best_columns
                scores[item, : best_values.size] = best_values
            if progress is not None and ((item + 1) % report_every == 0 or item + 1 == n_items):
                progress(item + 1, n_items)
    return NeighborTable(neighbors, scores)


def cap_items_per_user(
    user_index: np.ndarray,
    item_index: np.ndarray,
    n_users: int,
    n_items: int,
    max_items_per_user: int | None,
    *,
    order: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """The boolean mask of the interactions kept when each user keeps at most `max_items_per_user`.

    A user over the cap keeps the latest by `order` (larger is more recent; among equal values, the larger
    item indexes), or without `order` the items with the largest `member_hash(seed, user, item)`, a
    seeded pseudo-random sample. This is the cap both builders apply first (with the same `seed`).
    """
    users, items = _check_interactions(user_index, item_index, n_users, n_items)
    _check_cap("max_items_per_user", max_items_per_user)
    recency = _check_order(order, users.size)
    return _keep_per_group(users, items, n_users, max_items_per_user, recency, seed)


# --- the computations --------------------------------------------------------------------------------
def _swing_row(
    item: int, members: np.ndarray, history_indptr: np.ndarray, history_items: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Swing similarities of `item` to every item its `members` (≥ 2 users) share: (columns, values)."""
    lengths = history_indptr[members + 1] - history_indptr[members]
    ends = np.cumsum(lengths)
    positions = np.arange(ends[-1]) + np.repeat(history_indptr[members] - (ends - lengths), lengths)
    entry_members = np.repeat(np.arange(members.size), lengths)
    entry_items = history_items[positions]

    # Group the entries by item (members stay ascending within an item). Only items two members share
    # can be in a pair's intersection, or get a similarity.
    by_item = np.argsort(entry_items, kind="stable")
    entry_items, entry_members = entry_items[by_item], entry_members[by_item]
    firsts = np.flatnonzero(np.concatenate(([True], entry_items[1:] != entry_items[:-1])))
    counts = np.diff(np.append(firsts, entry_items.size))
    shared = counts >= 2
    firsts, counts = firsts[shared], counts[shared]
    columns = entry_items[firsts]
    starts = np.cumsum(counts) - counts
    kept = np.repeat(firsts - starts, counts) + np.arange(int(counts.sum()))
    member, column = entry_members[kept], np.repeat(np.arange(columns.size), counts)

    n_members = members.size
    pairs = int((counts * (counts - 1)).sum()) // 2
    if pairs * _PAIR_COST_IN_PRODUCTS < n_members * n_members * columns.size:
        similarities = _swing_by_pairs(member, column, counts, n_members, alpha)
    else:
        similarities = _swing_by_products(member, column, n_members, columns.size, alpha)
    other = columns != item
    return columns[other].astype(np.int32), similarities[other]


def _swing_by_pairs(
    member: np.ndarray, column: np.ndarray, counts: np.ndarray, n_members: int, alpha: float
) -> np.ndarray:
    """Swing of one item's members enumerating, for every shared item, its pairs of members.

    `member`/`column` are the entries grouped by column (`counts` each), members ascending in a column.
    Costs one step per (pair, shared item): cheaper than the products when few members share each item.
    """
    entry = np.arange(member.size)
    column_end = np.repeat(np.cumsum(counts), counts)
    partners = column_end - entry - 1  # the entries after this one in its column
    first = np.repeat(entry, partners)
    second = first + 1 + (np.arange(first.size) - np.repeat(np.cumsum(partners) - partners, partners))
    pair = member[first].astype(np.int64) * n_members + member[second]
    overlaps = np.bincount(pair, minlength=n_members * n_members)  # |I_u ∩ I_v| for u < v
    weights = 1.0 / (alpha + overlaps[pair])
    similarities: np.ndarray = np.bincount(column[first], weights=weights, minlength=counts.size)
    return similarities


def _swing_by_products(
    member: np.ndarray, column: np.ndarray, n_members: int, n_columns: int, alpha: float
) -> np.ndarray:
    """Swing of one item's members with dense products: with S the members × shared items indicator,
    O = S Sᵀ, P = 1 / (α + O) with a zero diagonal, similarities = ½ · colsum(S ⊙ (P S))."""
    consumed = np.zeros((n_members, n_columns), dtype=np.float64)
    consumed[member, column] = 1.0
    overlaps = consumed @ consumed.T
    pair_weights = 1.0 / (alpha + overlaps)
    np.fill_diagonal(pair_weights, 0.0)
    similarities: np.ndarray = 0.5 * np.einsum("uj,uj->j", consumed, pair_weights @ consumed)
    return similarities


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run Swing's many small dense products on one BLAS thread.

    Each product is too small for threads to pay off, and on a machine busy with other work, BLAS
    threads spinning at every call's barrier made MovieLens-100K's Swing 7× slower (3 s → 22 s on
    2 shared cores). The limit needs threadpoolctl; without it the build is as exact, only slower there.
    """
    try:
        threadpoolctl = importlib.import_module("threadpoolctl")
    except ImportError:
        yield
        return
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


def _select_top_k(
    rows: np.ndarray,
    columns: np.ndarray,
    values: np.ndarray,
    neighbors: np.ndarray,
    scores: np.ndarray,
) -> None:
    """Write each row's best candidates into `neighbors`/`scores` (`[n_rows, k]`, pre-filled padding).

    Candidates come grouped by ascending row, columns ascending within a row; ranked by float32 value
    (descending), ties by column.
    """
    n_rows, k = neighbors.shape
    values32 = values.astype(np.float32)
    counts = np.bincount(rows, minlength=n_rows)
    long_rows = counts > max(k, _LONG_ROW)

    short = ~long_rows[rows]
    if short.any():
        short_rows, short_columns, short_values = rows[short], columns[short], values32[short]
        # One stable sort on (row, descending value) keeps the ascending columns of equal values.
        key = (short_rows.astype(np.int64) << 32) | _descending_key(short_values)
        by_rank = np.argsort(key, kind="stable")
        short_rows, short_columns, short_values = (
            short_rows[by_rank],
            short_columns[by_rank],
            short_values[by_rank],
        )
        short_counts = np.where(long_rows, 0, counts)
        rank = np.arange(short_rows.size) - (np.cumsum(short_counts) - short_counts)[short_rows]
        top = rank < k
        neighbors[short_rows[top], rank[top]] = short_columns[top]
        scores[short_rows[top], rank[top]] = short_values[top]

    starts = np.cumsum(counts) - counts
    for row in np.flatnonzero(long_rows):
        segment = slice(starts[row], starts[row] + counts[row])
        best_columns, best_values = _top_k_row(columns[segment], values32[segment], k)
        neighbors[row] = best_columns
        scores[row] = best_values


def _top_k_row(columns: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The (at most) k best of one row's candidates, by value descending then column ascending."""
    if values.size > k:
        kth_best = np.partition(values, values.size - k)[values.size - k]
        candidates = np.flatnonzero(values >= kth_best)
        columns, values = columns[candidates], values[candidates]
    best = np.lexsort((columns, -values))[:k]
    return columns[best], values[best]


def _descending_key(values: np.ndarray) -> np.ndarray:
    """int64 keys in [0, 2³²) that sort float32 `values` in descending order."""
    bits = values.view(np.int32).astype(np.int64)
    ascending = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # IEEE order for negative floats
    return np.int64(2**31 - 1) - ascending


def _blocks(row_products: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split rows into consecutive [start, stop) blocks of at most `budget` products (or one row)."""
    cumulative = np.cumsum(row_products)
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < row_products.size:
        before = cumulative[start - 1] if start > 0 else 0.0
        stop = int(np.searchsorted(cumulative, before + budget, side="right"))
        stop = max(stop, start + 1)
        bounds.append((start, stop))
        start = stop
    return bounds


def member_hash(seed: int, group: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Spark SQL's `xxhash64(seed, group, member)` over int columns, as int64: XXH64 of each value's
    four bytes, chained from Spark's seed 42. The caps' samples are "the members with the largest
    hash", which numpy and Spark (training/spark_cf.py) compute identically, so both engines keep
    the same interactions; a random generator's stream could not be reproduced on a cluster."""
    state = np.full(np.shape(group), 42, dtype=np.uint64)
    for column in (np.full(np.shape(group), seed, dtype=np.int64), group, member):
        state = _xxh64_int(np.asarray(column, dtype=np.int64), state)
    hashed: np.ndarray = state.view(np.int64)
    return hashed


_P1, _P2, _P3, _P5 = (
    np.uint64(0x9E3779B185EBCA87),
    np.uint64(0xC2B2AE3D27D4EB4F),
    np.uint64(0x165667B19E3779F9),
    np.uint64(0x27D4EB2F165667C5),
)


def _xxh64_int(values: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """XXH64 of 4-byte little-endian ints with per-row seeds (Spark's `XXH64.hashInt`)."""
    with np.errstate(over="ignore"):  # the arithmetic is modulo 2⁶⁴ by design
        state = seed + _P5 + np.uint64(4)
        state ^= (values.astype(np.uint64) & np.uint64(0xFFFFFFFF)) * _P1
        state = ((state << np.uint64(23)) | (state >> np.uint64(41))) * _P2 + _P3
        state ^= state >> np.uint64(33)
        state *= _P2
        state ^= state >> np.uint64(29)
        state *= _P3
        state ^= state >> np.uint64(32)
    return state


def _keep_per_group(
    group: np.ndarray,
    member: np.ndarray,
    n_groups: int,
    cap: int | None,
    recency: np.ndarray | None,
    seed: int,
) -> np.ndarray:
    """Mask keeping at most `cap` entries per group: the largest `recency` (the larger `member` on
    ties), or without `recency` the largest `member_hash(seed, group, member)` (a pseudo-random sample
    Spark reproduces)."""
    keep = np.ones(group.size, dtype=bool)
    if cap is None:
        return keep
    counts = np.bincount(group, minlength=n_groups)
    crowded = counts > cap
    if not crowded.any():
        return keep
    positions = np.flatnonzero(crowded[group])
    members = member[positions]
    key = member_hash(seed, group[positions], members) if recency is None else recency[positions]
    by_group = np.lexsort((members, key, group[positions]))  # within a group: key, then member ascending
    positions = positions[by_group]
    groups = group[positions]
    group_counts = np.where(crowded, counts, 0)
    rank = np.arange(positions.size) - (np.cumsum(group_counts) - group_counts)[groups]
    keep[positions[rank < counts[groups] - cap]] = False
    return keep


def _csr(
    rows: np.ndarray,
    columns: np.ndarray,
    values: np.ndarray,
    n_rows: int,
    n_columns: int,
    rows_name: str,
    columns_name: str,
) -> sp.csr_matrix:
    """A CSR matrix with sorted indices; a repeated (row, column) pair is a ValueError."""
    keys = rows.astype(np.int64) * n_columns + columns
    by_key = np.argsort(keys)
    keys = keys[by_key]
    repeated = np.flatnonzero(keys[1:] == keys[:-1])
    if repeated.size:
        first = int(keys[repeated[0]])
        raise ValueError(
            f"{rows_name}, {columns_name}: the pair ({first // n_columns}, {first % n_columns}) "
            "occurs more than once; pass each (user, item) interaction once"
        )
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    index_type = np.int32 if max(n_columns, rows.size) < 2**31 else np.int64
    return sp.csr_matrix(
        (values[by_key], columns[by_key].astype(index_type), indptr.astype(index_type)),
        shape=(n_rows, n_columns),
    )


# --- input checks ------------------------------------------------------------------------------------
def _check_index(name: str, index: np.ndarray, size: int, size_name: str) -> np.ndarray:
    # int32 indexes halve the memory of 10⁷-row builds.
    return check_index(name, index, size, size_name, np.int32 if size < 2**31 else np.int64)


def _check_interactions(
    user_index: np.ndarray, item_index: np.ndarray, n_users: int, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    users = _check_index("user_index", user_index, n_users, "n_users")
    items = _check_index("item_index", item_index, n_items, "n_items")
    if users.size != items.size:
        raise ValueError(f"item_index: has {items.size} entries, user_index has {users.size}")
    return users, items


def _check_like_weight(like_weight: np.ndarray, size: int) -> np.ndarray:
    if (
        not isinstance(like_weight, np.ndarray)
        or like_weight.ndim != 1
        or not (np.issubdtype(like_weight.dtype, np.floating) or np.issubdtype(like_weight.dtype, np.integer))
    ):
        raise ValueError(f"like_weight: expected a 1-D numeric array, got {describe(like_weight)}")
    if like_weight.size != size:
        raise ValueError(f"like_weight: has {like_weight.size} entries, user_index has {size}")
    weights = like_weight.astype(np.float64)
    if weights.size and not (np.isfinite(weights).all() and weights.min() > 0):
        bad = weights[~(np.isfinite(weights) & (weights > 0))][0]
        raise ValueError(f"like_weight: every weight must be finite and > 0, got {bad}")
    return weights


def _check_order(order: np.ndarray | None, size: int) -> np.ndarray | None:
    if order is None:
        return None
    if (
        not isinstance(order, np.ndarray)
        or order.ndim != 1
        or not (np.issubdtype(order.dtype, np.integer) or np.issubdtype(order.dtype, np.floating))
    ):
        raise ValueError(f"order: expected a 1-D numeric array, got {describe(order)}")
    if order.size != size:
        raise ValueError(f"order: has {order.size} entries, user_index has {size}")
    if np.issubdtype(order.dtype, np.floating) and not np.isfinite(order).all():
        raise ValueError("order: every value must be finite")
    return order


def _check_top_k(top_k: int) -> None:
    if not isinstance(top_k, int | np.integer) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k: expected a positive integer, got {top_k!r}")


def _check_cap(name: str, cap: int | None) -> None:
    if cap is not None and (not isinstance(cap, int | np.integer) or isinstance(cap, bool) or cap < 1):
        raise ValueError(f"{name}: expected a positive integer or None, got {cap!r}")
