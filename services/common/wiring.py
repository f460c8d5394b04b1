"""Pieces every service's wiring (`app.py`) shares."""

from __future__ import annotations

from recsys.feature_store import FeatureStore, InProcessFeatureStore, open_feature_store
from recsys.probe import probe
from recsys.serving_model import ServingModel
from recsys.store import ModelStore
from services.common.server import Readiness
from services.common.versions import Loaded


def feature_store_for(
    redis_url: str | None,
    prefix: str,
    given: FeatureStore | None = None,
    *,
    read_budget: float | None = None,
) -> FeatureStore:
    """The feature store a service uses: the one given (tests, `recsys up` sharing one store
    between services), Redis when a URL is set, else the embedded in-process store.
    `read_budget` (seconds): the service's budget for a read, which the Redis store applies
    as the read's one timeout."""
    if given is not None:
        return given
    if redis_url:
        options = {} if read_budget is None else {"read_timeout": read_budget}
        return open_feature_store(redis_url, prefix=prefix, **options)
    return InProcessFeatureStore()


def load_serving_model(store: ModelStore, version: str) -> ServingModel:
    """Load a version and build its lookups and feature tables now, in the loading thread,
    rather than on the first request; refuse it (ModelProbeError) when its models answer a
    probe batch with non-finite or out-of-range outputs."""
    path = store.version_path(version)
    model = ServingModel.load(path, version=version)
    model.warm()
    probe(model, path)
    return model


async def version_loaded(
    features: FeatureStore, readiness: Readiness | None, loaded: Loaded[ServingModel]
) -> None:
    """A version was swapped in: the embedded feature store learns its users' snapshots (a
    Redis store got them from push-features), and the service can answer."""
    if isinstance(features, InProcessFeatureStore):
        features.add_version(loaded.version, loaded.model.core)
    if readiness is not None:
        await readiness.set_serving(True)
