"""Serving through a lost snapshot: when a model version's features vanish from the feature
store (Redis restarted empty, a flush), every user reads as having no history, which turns
nearly every answer into a cold start. Until the features are pushed again the services
take each user's snapshot from the model version itself, the very data push-features
writes, and keep what Redis still has (live events since, exposures, the cache)."""

from __future__ import annotations

import dataclasses

import numpy as np

from recsys.artifacts import CoreArtifacts
from recsys.feature_store.base import Snapshot, UserState


def version_snapshot(core: CoreArtifacts, user_index: int) -> Snapshot:
    """The snapshot push-features writes for the user at `user_index` (empty when unknown)."""
    if not 0 <= user_index < core.users.n_users:
        return Snapshot.empty()
    history = core.history
    return Snapshot(
        np.asarray(history.items.row(user_index), dtype=np.int32),
        np.asarray(history.times.row(user_index), dtype=np.int64),
        np.asarray(history.ratings.row(user_index), dtype=np.float32),
        int(core.users.regions[user_index]),
    )


def with_version_snapshot(state: UserState, core: CoreArtifacts, user_index: int) -> UserState:
    """`state` with its snapshot taken from the model version instead of the feature store."""
    return dataclasses.replace(state, snapshot=version_snapshot(core, user_index))
