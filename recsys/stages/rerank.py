"""Rerank: choose the list shown from the ranked candidates, trading reward for diversity
under business rules.

Three selectors share one greedy loop (one step per position, each step vectorised over
all candidates):

- `TopKSelector`: by reward alone;
- `MmrSelector`: maximal marginal relevance, θ·reward − (1−θ)·max cosine similarity to
  the last W items chosen;
- `DppSelector`: greedy MAP inference for a determinantal point process with an
  incremental Cholesky factor and a sliding window (Chen, Zhang & Zhou, NeurIPS 2018,
  "Fast Greedy MAP Inference for Determinantal Point Process to Improve Recommendation
  Diversity", algorithms 1 and 2).

Rewards are any real numbers (fused ranker scores, on a scale that changes with the fusion
weights): each call rescales them to [0, 1] (min → 0, max → 1, all equal → 0) so that θ
means the same trade-off in every scene. Embeddings are re-normalised to unit length (a zero
row, an item without an embedding, stays zero: similar to nothing).

Business rules (`RerankRules`) are enforced while selecting: at each position the
candidates that would break a rule there are passed over. When every remaining candidate
breaks some rule, the ones breaking the fewest rules compete instead, so the list is always
`min(count, n)` long and a rule gives way only where the candidates leave no choice.

New-item traffic (`NewItemTraffic`, a scene's `new_items`): the candidates the caller marks
as new (`NewCandidates`: items upserted less than `max_age_seconds` ago) get a boost added
to their rescaled reward that halves every `boost_half_life_impressions` impressions, and
`slots` positions are theirs: at most `slots` new items are shown (a hard cap, unlike the
rules: when only new items are left the list stops short of `count`), and when fewer made
it by their boosted score, the best remaining new candidates fill the last positions, so a
scene shows `min(slots, new candidates)` new items in every answer long enough to hold them.
Cap and reservation come before the business rules: among the candidates they allow, the
rules decide as above (so a rule gives way in a reserved position if every new item breaks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from recsys.artifacts import FloatArray, IntArray

RerankMethod = Literal["mmr", "dpp", "none"]
RERANK_METHODS: tuple[RerankMethod, ...] = ("mmr", "dpp", "none")

# Below this squared residual a candidate adds no new direction to the DPP window: its log
# gain is floored here (instead of −inf) so reward still orders such candidates.
_DPP_EPSILON = 1e-10


@dataclass(frozen=True)
class RerankRules:
    """Business rules on the shown list. `None` turns a rule off.

    - `max_consecutive_category`: at most this many items in a row share a category (an
      item with several categories extends the run of each of them);
    - `max_consecutive_author`: at most this many items in a row by the same author
      (author 0, unknown, never counts);
    - `first_screen`: how many positions the first screen holds (0: no first-screen caps);
    - `first_screen_max_per_category` / `first_screen_max_per_author`: at most this many
      items of one category / by one author within the first screen.
    """

    max_consecutive_category: int | None = None
    max_consecutive_author: int | None = None
    first_screen: int = 10
    first_screen_max_per_category: int | None = None
    first_screen_max_per_author: int | None = None

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            minimum = 0 if spec.name == "first_screen" else 1
            if value is None and spec.name != "first_screen":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                allowed = "an integer ≥ 0" if minimum == 0 else "an integer ≥ 1 or null (off)"
                raise ValueError(f"{spec.name}: must be {allowed}, got {value!r}")

    @property
    def active(self) -> bool:
        return (
            self.max_consecutive_category is not None
            or self.max_consecutive_author is not None
            or (self.first_screen > 0 and self.first_screen_max_per_category is not None)
            or (self.first_screen > 0 and self.first_screen_max_per_author is not None)
        )

    def violations(self, categories: npt.NDArray[np.integer], authors: npt.NDArray[np.integer]) -> list[str]:
        """Every rule a finished list breaks, one message per (position, rule); empty when
        the list complies. `categories` [k, max_categories] and `authors` [k] are the list's
        items' tokens in display order. For tests, evaluation and debug traces."""
        categories = _as_matrix(categories)
        problems: list[str] = []
        tracker = _RuleTracker(self, categories, np.asarray(authors))
        for position in range(categories.shape[0]):
            for rule in tracker.broken(position, position):
                problems.append(f"position {position}: {rule}")
            tracker.place(position, position)
        return problems


@dataclass(frozen=True)
class NewItemTraffic:
    """A scene's share of the answer for new items (see the module docstring). `slots` 0 is
    off: no boost, no cap, no reservation.

    - `slots`: how many positions new items get (at most, and at least when there are
      that many new candidates);
    - `max_age_seconds`: an item counts as new for this long after its upsert;
    - `boost`: added to a new item's reward (rewards are rescaled to [0, 1] first, so 1.0
      lifts it by the whole range of the candidates' rewards), times
      0.5 ** (impressions / `boost_half_life_impressions`).
    """

    slots: int = 0
    max_age_seconds: float = 3 * 86_400.0
    boost: float = 0.0
    boost_half_life_impressions: float = 100.0

    def __post_init__(self) -> None:
        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or self.slots < 0:
            raise ValueError(f"slots: must be an integer ≥ 0, got {self.slots!r}")
        for name in ("max_age_seconds", "boost", "boost_half_life_impressions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name}: must be a finite number, got {value!r}")
        if self.max_age_seconds <= 0:
            raise ValueError(f"max_age_seconds: must be > 0, got {self.max_age_seconds!r}")
        if self.boost < 0:
            raise ValueError(f"boost: must be ≥ 0, got {self.boost!r}")
        if self.boost_half_life_impressions <= 0:
            raise ValueError(
                f"boost_half_life_impressions: must be > 0, got {self.boost_half_life_impressions!r}"
            )

    @property
    def active(self) -> bool:
        return self.slots > 0

    def boosts(self, impressions: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """The boost of new items shown `impressions` times so far."""
        shown = np.maximum(np.asarray(impressions, np.float64), 0.0)
        boosted: npt.NDArray[np.float64] = self.boost * np.exp2(-shown / self.boost_half_life_impressions)
        return boosted


@dataclass(frozen=True, eq=False)
class NewCandidates:
    """Which of a call's candidates are new items under `traffic` (fresh [n] bool) and how
    often each was shown (impressions [n], any value for the others)."""

    traffic: NewItemTraffic
    fresh: npt.NDArray[np.bool_]
    impressions: npt.NDArray[Any]

    def check(self, n: int) -> None:
        if np.shape(self.fresh) != (n,):
            raise ValueError(f"fresh: expected shape ({n},), got {np.shape(self.fresh)}")
        if np.shape(self.impressions) != (n,):
            raise ValueError(f"impressions: expected shape ({n},), got {np.shape(self.impressions)}")


class Selector(Protocol):
    """Chooses the shown list: positions into the candidate arrays, in display order."""

    @property
    def identifier(self) -> str: ...

    def select(
        self,
        items: IntArray,
        rewards: FloatArray,
        embeddings: FloatArray | None,
        categories: IntArray,
        authors: IntArray,
        count: int,
        new: NewCandidates | None = None,
    ) -> IntArray: ...


class _Gains(Protocol):
    """A selector's per-step scores (higher is better) and its memory of what was chosen:
    after `chose(p)`, `scores()[p]` is −inf (so the loop need not mask chosen candidates)."""

    def scores(self) -> npt.NDArray[np.float64]: ...

    def chose(self, position: int) -> None: ...


class _GreedySelector:
    identifier: str

    def __init__(self, rules: RerankRules | None) -> None:
        self.rules = rules or RerankRules()

    def select(
        self,
        items: IntArray,
        rewards: FloatArray,
        embeddings: FloatArray | None,
        categories: IntArray,
        authors: IntArray,
        count: int,
        new: NewCandidates | None = None,
    ) -> IntArray:
        """Positions into `items` (and the aligned arrays), in display order: exactly
        `min(count, len(items))` distinct ones (fewer only when `new` caps new items and
        nothing else is left).

        items [n]; rewards [n] finite reals (higher is better); embeddings [n, d] (unused
        by `TopKSelector`, may be None there); categories [n, max_categories] category
        tokens, 0 pads (a 1-D array is one category per item); authors [n] author tokens,
        0 unknown; new: the new candidates and their scene's traffic control (None: none)."""
        n = _check_inputs(items, rewards, embeddings, categories, authors, count)
        if new is not None:
            new.check(n)
        length = min(count, n)
        if length == 0:
            return np.zeros(0, np.int32)
        reward = _unit_interval(np.asarray(rewards, np.float64))
        fresh: npt.NDArray[np.bool_] | None = None
        slots = reserve = 0
        if new is not None and new.traffic.active and bool(np.any(new.fresh)):
            fresh = np.asarray(new.fresh, dtype=bool)
            n_fresh = int(np.count_nonzero(fresh))
            slots = new.traffic.slots
            # Added after the rescale: the other candidates keep their [0, 1] rewards.
            reward = reward + np.where(fresh, new.traffic.boosts(new.impressions), 0.0)
            length = min(length, n - n_fresh + slots)
            reserve = min(slots, n_fresh, length)
        gains = self._gains(reward, embeddings)
        if not self.rules.active and gains is None and fresh is None:
            return np.argsort(-reward, kind="stable")[:length].astype(np.int32)
        if gains is not None:
            scores_of = gains.scores
        else:
            open_reward = reward.copy()  # chosen ones set to −inf, as the gains do
            scores_of = lambda: open_reward  # noqa: E731
        tracker = (
            _RuleTracker(self.rules, _as_matrix(categories), np.asarray(authors))
            if self.rules.active
            else None
        )
        available = np.ones(n, dtype=bool)
        chosen = np.empty(length, np.int32)
        placed_new = 0
        for position in range(length):
            scores = scores_of()
            allowed = available
            if fresh is not None:
                if placed_new >= slots:  # the cap: no more new items
                    allowed = available & ~fresh
                elif length - position <= reserve - placed_new:  # the reservation's positions
                    allowed = available & fresh
            broken = None if tracker is None else tracker.count_broken(position)
            if broken is None and allowed is available:
                # No rule blocks anyone here and no new-item control: the chosen are at −inf
                # already, so the best score is the choice (the usual case, no mask built).
                choice = int(np.argmax(scores))
            else:
                eligible = allowed if broken is None else allowed & (broken == broken[allowed].min())
                choice = int(np.argmax(np.where(eligible, scores, -np.inf)))
            chosen[position] = choice
            available[choice] = False
            if fresh is not None and fresh[choice]:
                placed_new += 1
            if tracker is not None:
                tracker.place(choice, position)
            if gains is not None:
                gains.chose(choice)
            else:
                open_reward[choice] = -np.inf
        return chosen

    def _gains(self, reward: npt.NDArray[np.float64], embeddings: FloatArray | None) -> _Gains | None:
        """None: score by reward alone."""
        raise NotImplementedError


class TopKSelector(_GreedySelector):
    """The best rewards first, under the rules (a scene's rerank method "none")."""

    identifier = "top_k"

    def __init__(self, rules: RerankRules | None = None) -> None:
        super().__init__(rules)

    def _gains(self, reward: npt.NDArray[np.float64], embeddings: FloatArray | None) -> _Gains | None:
        return None


class MmrSelector(_GreedySelector):
    """Maximal marginal relevance: at each position the candidate maximising
    θ·reward − (1−θ)·max cosine similarity to the last `window` items chosen (0 for the
    first item). θ = 1 is reward order; smaller θ favours items unlike the recent ones."""

    identifier = "mmr"

    def __init__(self, theta: float, window: int, rules: RerankRules | None = None) -> None:
        super().__init__(rules)
        self.theta = _check_theta(theta)
        self.window = _check_window(window)

    def _gains(self, reward: npt.NDArray[np.float64], embeddings: FloatArray | None) -> _Gains | None:
        if self.theta == 1.0:
            return None
        return _MmrGains(reward, _unit_rows(_require(embeddings, self.identifier)), self.theta, self.window)


class DppSelector(_GreedySelector):
    """Greedy DPP MAP inference over the kernel L = diag(q)·S·diag(q), S the cosine
    similarities and q = exp(α·reward) with α = θ / (2(1−θ)) (the paper's trade-off), so
    the log det of a set is Σ 2α·reward + log det S and each step maximises
    θ·reward + (1−θ)·log(det S[W ∪ {j}] / det S[W]) over the last `window` chosen items W.

    The ratio of determinants is the squared residual of j's embedding after projecting
    out W, kept for every candidate by an incremental Cholesky factor: O(n·W) per step.
    When the window is full its oldest item leaves through Givens rotations of the factor
    (a rank-one update, again O(n·W)). Working on S with the quality term in log space is
    the same greedy as on L, without exp(α·reward) overflowing as θ → 1. θ = 1 is reward
    order."""

    identifier = "dpp"

    def __init__(self, theta: float, window: int, rules: RerankRules | None = None) -> None:
        super().__init__(rules)
        self.theta = _check_theta(theta)
        self.window = _check_window(window)

    def _gains(self, reward: npt.NDArray[np.float64], embeddings: FloatArray | None) -> _Gains | None:
        if self.theta == 1.0:
            return None
        return _DppGains(reward, _unit_rows(_require(embeddings, self.identifier)), self.theta, self.window)


class _MmrGains:
    def __init__(
        self, reward: npt.NDArray[np.float64], embeddings: npt.NDArray[np.float64], theta: float, window: int
    ) -> None:
        self._relevance = theta * reward
        self._weight = 1.0 - theta
        self._embeddings = embeddings
        # Similarities of every candidate to the last `window` chosen, a ring of rows, and
        # their column-wise max (the penalty), kept as the window fills.
        self._recent = np.zeros((window, reward.shape[0]), np.float64)
        self._penalty = np.full(reward.shape[0], -np.inf)
        self._scores = self._relevance
        self._filled = 0
        self._next = 0

    def scores(self) -> npt.NDArray[np.float64]:
        return self._scores

    def chose(self, position: int) -> None:
        self._relevance[position] = -np.inf
        similarity = self._embeddings @ self._embeddings[position]
        self._recent[self._next] = similarity
        self._next = (self._next + 1) % self._recent.shape[0]
        if self._filled < self._recent.shape[0]:  # a max only grows until a row leaves
            self._filled += 1
            np.maximum(self._penalty, similarity, out=self._penalty)
        else:
            self._recent.max(axis=0, out=self._penalty)
        self._scores = self._relevance - self._weight * self._penalty


class _DppGains:
    """For every candidate i: `_factor[i, :k]` = c_i = V⁻¹·S[W, i] (V the Cholesky factor of
    S[W], W the window's items oldest first) and `_residual[i]` = S[i, i] − |c_i|² =
    det S[W ∪ {i}] / det S[W]. The rows of the window's own items form V itself."""

    def __init__(
        self, reward: npt.NDArray[np.float64], embeddings: npt.NDArray[np.float64], theta: float, window: int
    ) -> None:
        self._relevance = theta * reward
        self._weight = 1.0 - theta
        self._embeddings = embeddings
        self._factor = np.zeros((reward.shape[0], window), np.float64)
        self._residual = np.einsum("ij,ij->i", embeddings, embeddings)
        self._members: list[int] = []

    def scores(self) -> npt.NDArray[np.float64]:
        log_gain: npt.NDArray[np.float64] = np.log(np.maximum(self._residual, _DPP_EPSILON))
        return self._relevance + self._weight * log_gain

    def chose(self, position: int) -> None:
        self._relevance[position] = -np.inf
        if self._residual[position] <= _DPP_EPSILON:
            # Already spanned by the window (a duplicate, or a rule forced it): it adds no
            # direction, and dividing by its residual would blow the factor up.
            return
        if len(self._members) == self._factor.shape[1]:
            self._drop_oldest()
        k = len(self._members)
        factor = self._factor
        gain = math.sqrt(self._residual[position])
        column = (self._embeddings @ self._embeddings[position] - factor[:, :k] @ factor[position, :k]) / gain
        factor[:, k] = column
        self._residual = np.maximum(self._residual - column * column, 0.0)
        self._members.append(position)

    def _drop_oldest(self) -> None:
        """Remove the window's oldest item from the factor. Below its first row the window's
        factor is V = [v | V₂] with S[W′] = V₂V₂ᵀ + vvᵀ: a rank-one update. Givens rotations
        of column 0 against column j = 1 … k−1 (each zeroing v's entry j against the
        diagonal V[j, j]) make an orthogonal Q with VQ = [0 | V′]; for every candidate's row
        c, c′ = (cQ)[1:] and the residual grows by the part of cQ left in column 0.

        Q is built from V alone (k × k, scalar arithmetic, the rotations being sequential),
        then applied to all candidates in one product."""
        factor, members = self._factor, self._members
        k = len(members)
        window = factor[members].tolist()
        spill = [row[0] for row in window]  # column 0 of V as the rotations change it
        rotation = np.eye(k).tolist()
        for j in range(1, k):
            radius = math.hypot(window[j][j], spill[j])
            if radius == 0.0:
                continue
            cosine, sine = window[j][j] / radius, spill[j] / radius
            for i in range(j + 1, k):
                spill[i] = cosine * spill[i] - sine * window[i][j]
            for row in rotation:
                row[0], row[j] = cosine * row[0] - sine * row[j], cosine * row[j] + sine * row[0]
        rotated = factor @ np.asarray(rotation)
        self._residual += rotated[:, 0] ** 2
        factor[:, :-1] = rotated[:, 1:]
        factor[:, -1] = 0.0
        members.pop(0)


class _RuleTracker:
    """The rules' state along the list being built: runs of categories and author at its
    end, and per-category and per-author counts within the first screen."""

    def __init__(
        self, rules: RerankRules, categories: npt.NDArray[np.integer], authors: npt.NDArray[np.integer]
    ):
        self._rules = rules
        self._categories = categories
        self._authors = authors
        self._category_runs: dict[int, int] = {}
        self._last_author = 0
        self._author_run = 0
        self._screen_categories: dict[int, int] = {}
        self._screen_authors: dict[int, int] = {}

    def _blocked(self, position: int) -> tuple[list[int], list[int], list[int], list[int]]:
        """Category and author tokens a candidate must not have at `position`, per rule."""
        rules = self._rules
        run_categories: list[int] = []
        run_authors: list[int] = []
        screen_categories: list[int] = []
        screen_authors: list[int] = []
        if rules.max_consecutive_category is not None:
            limit = rules.max_consecutive_category
            run_categories = [token for token, run in self._category_runs.items() if run >= limit]
        limit_author = rules.max_consecutive_author
        if limit_author is not None and self._last_author != 0 and self._author_run >= limit_author:
            run_authors = [self._last_author]
        if position < rules.first_screen:
            if rules.first_screen_max_per_category is not None:
                cap = rules.first_screen_max_per_category
                screen_categories = [token for token, seen in self._screen_categories.items() if seen >= cap]
            if rules.first_screen_max_per_author is not None:
                cap = rules.first_screen_max_per_author
                screen_authors = [token for token, seen in self._screen_authors.items() if seen >= cap]
        return run_categories, run_authors, screen_categories, screen_authors

    def count_broken(self, position: int) -> npt.NDArray[np.int8] | None:
        """How many rules each candidate would break at `position`; None when no rule
        blocks anything there (every candidate breaks none)."""
        run_categories, run_authors, screen_categories, screen_authors = self._blocked(position)
        if not (run_categories or run_authors or screen_categories or screen_authors):
            return None
        broken = np.zeros(self._authors.shape[0], np.int8)
        # Tokens are never 0 in the blocked lists, so padding never matches.
        if run_categories:
            broken += np.isin(self._categories, run_categories).any(axis=1)
        if run_authors:
            broken += self._authors == run_authors[0]
        if screen_categories:
            broken += np.isin(self._categories, screen_categories).any(axis=1)
        if screen_authors:
            broken += np.isin(self._authors, screen_authors)
        return broken

    def broken(self, candidate: int, position: int) -> list[str]:
        """The rules `candidate` would break at `position`, described."""
        run_categories, run_authors, screen_categories, screen_authors = self._blocked(position)
        rules = self._rules
        own = {int(token) for token in self._categories[candidate] if token != 0}
        author = int(self._authors[candidate])
        problems = [
            f"category {token} more than {rules.max_consecutive_category} times in a row"
            for token in sorted(own.intersection(run_categories))
        ]
        if author in run_authors:
            problems.append(f"author {author} more than {rules.max_consecutive_author} times in a row")
        problems += [
            f"category {token} more than {rules.first_screen_max_per_category} times "
            f"in the first {rules.first_screen}"
            for token in sorted(own.intersection(screen_categories))
        ]
        if author in screen_authors:
            problems.append(
                f"author {author} more than {rules.first_screen_max_per_author} times "
                f"in the first {rules.first_screen}"
            )
        return problems

    def place(self, candidate: int, position: int) -> None:
        # Only the counts a rule that is on reads (`_blocked`): the rest is not kept.
        rules = self._rules
        screen = position < rules.first_screen
        runs, per_screen = rules.max_consecutive_category is not None, rules.first_screen_max_per_category
        if runs or (screen and per_screen is not None):
            own = {token for token in self._categories[candidate].tolist() if token != 0}
            if runs:
                self._category_runs = {token: self._category_runs.get(token, 0) + 1 for token in own}
            if screen and per_screen is not None:
                for token in own:
                    self._screen_categories[token] = self._screen_categories.get(token, 0) + 1
        author = int(self._authors[candidate])
        self._author_run = self._author_run + 1 if author == self._last_author else 1
        self._last_author = author
        if screen and author != 0 and rules.first_screen_max_per_author is not None:
            self._screen_authors[author] = self._screen_authors.get(author, 0) + 1


def selector_for(method: RerankMethod, theta: float, window: int, rules: RerankRules | None) -> Selector:
    """The selector a scene's rerank configuration names."""
    if method == "mmr":
        return MmrSelector(theta, window, rules)
    if method == "dpp":
        return DppSelector(theta, window, rules)
    if method == "none":
        return TopKSelector(rules)
    raise ValueError(f"method: must be one of {', '.join(RERANK_METHODS)}, got {method!r}")


def _check_theta(theta: float) -> float:
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta: must be a number in [0, 1], got {theta!r}")
    return float(theta)


def _check_window(window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: must be an integer ≥ 1, got {window!r}")
    return window


def _require(embeddings: FloatArray | None, method: str) -> FloatArray:
    if embeddings is None:
        raise ValueError(f"embeddings: required by the {method} selector")
    return embeddings


def _as_matrix(categories: npt.NDArray[np.integer]) -> npt.NDArray[np.integer]:
    categories = np.asarray(categories)
    return categories[:, None] if categories.ndim == 1 else categories


def _check_inputs(
    items: IntArray,
    rewards: FloatArray,
    embeddings: FloatArray | None,
    categories: IntArray,
    authors: IntArray,
    count: int,
) -> int:
    if np.ndim(items) != 1:
        raise ValueError(f"items: expected a 1-D array, got shape {np.shape(items)}")
    n = int(np.shape(items)[0])
    if np.shape(rewards) != (n,):
        raise ValueError(f"rewards: expected shape ({n},), got {np.shape(rewards)}")
    if not np.isfinite(rewards).all():
        raise ValueError("rewards: must be finite")
    if embeddings is not None:
        if np.ndim(embeddings) != 2 or np.shape(embeddings)[0] != n:
            raise ValueError(f"embeddings: expected shape ({n}, dim), got {np.shape(embeddings)}")
        if not np.isfinite(embeddings).all():
            raise ValueError("embeddings: must be finite")
    if np.ndim(categories) not in (1, 2) or np.shape(categories)[0] != n:
        raise ValueError(f"categories: expected shape ({n}, max_categories), got {np.shape(categories)}")
    if np.shape(authors) != (n,):
        raise ValueError(f"authors: expected shape ({n},), got {np.shape(authors)}")
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
        raise ValueError(f"count: must be an integer ≥ 0, got {count!r}")
    return n


def _unit_interval(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _unit_rows(embeddings: FloatArray) -> npt.NDArray[np.float64]:
    rows = np.asarray(embeddings, np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit: npt.NDArray[np.float64] = np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
    return unit
