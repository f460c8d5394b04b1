"""Scenes and experiments: the request pipeline's configuration, declared as data.

A **scene** is a named pipeline configuration: recall channel quotas and candidate count,
pre-rank size, score fusion, rerank method and business rules, count limits. Requests name
one; an empty name is `default`. Scenes are read once at start-up from JSON:

    {"scenes": {
        "default": {"rerank": {"method": "mmr", "theta": 0.7}},
        "home": {
            "quotas": {"itemcf": 300, "two_tower": 300, "popular": 100},
            "recall_candidates": 800,
            "prerank_keep": 200,
            "fusion": {"method": "weighted_sum", "weights": {"like": 1.5}},
            "rerank": {"method": "dpp", "theta": 0.6, "window": 8,
                       "rules": {"max_consecutive_category": 2, "max_consecutive_author": 1,
                                 "first_screen": 10, "first_screen_max_per_category": 4,
                                 "first_screen_max_per_author": 2}},
            "count": {"default": 20, "max": 100},
            "new_items": {"slots": 2, "max_age": "3d", "boost": 0.3,
                          "boost_half_life_impressions": 100}},
        "trending": {"pipeline": ["recall", "blocklist", "rerank"]}}}

Every field is optional: `default` starts from the built-in `DEFAULT_SCENE`, every other
scene from the resolved `default`. Objects override field by field, and the two mappings
(`quotas`, `fusion.weights` / `fusion.exponents`) key by key: set a quota to 0 to turn a
channel off, a weight to 0 to drop a task. An empty `quotas` leaves the quotas to recall.

`new_items` is traffic control for items of the live catalogue upserted less than `max_age`
ago (seconds, or a string such as "90m", "12h", "3d"; default 3 days): rerank adds `boost`
(in units of the candidates' reward range, default 0) to their reward, halved every
`boost_half_life_impressions` impressions (default 100), shows at most `slots` of them and,
when fewer made it by score, gives the last positions to the best remaining ones (see
`recsys.stages.rerank.NewItemTraffic`). `slots` 0, the default, is off. `max_age` also says
which items `recsys_gateway_new_item_impressions_total` counts for the scene, off or not.

`pipeline` lists the request's stages in order: `recall` (required, first), then any of
`blocklist`, `rank` and `rerank` in that order (default: all four). A scene without `rank`
serves recall's candidates in pre-rank order, without `rerank` the best `count` by score.

An **experiment** splits the users of some scenes into arms by a stable salted hash; each
arm overrides the scene with an object of the same schema (see `ExperimentConfig`).

Configuration mistakes raise `ConfigError` (a `ValueError`) naming the JSON path, e.g.
`scenes.home.rerank.theta: must be a number in [0, 1], got 1.5`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

import xxhash

from recsys.errors import InvalidArgument
from recsys.stages.fusion import Fusion, FusionMethod
from recsys.stages.rerank import (
    RERANK_METHODS,
    NewItemTraffic,
    RerankMethod,
    RerankRules,
    Selector,
    selector_for,
)

DEFAULT_SCENE_NAME = "default"
# The stages a scene's pipeline may list, in the only order they can run.
PIPELINE_STAGES: tuple[str, ...] = ("recall", "blocklist", "rank", "rerank")
FUSION_METHODS: tuple[FusionMethod, ...] = ("weighted_sum", "weighted_product")
# Scene, experiment and arm names become metric labels and log fields: short and plain.
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHARE_TOLERANCE = 1e-9
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3_600.0, "d": 86_400.0}


class ConfigError(ValueError):
    """A configuration file is wrong; `path` names the field (`scenes.home.rerank.theta`)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class Scene:
    """One pipeline configuration. Mappings are read-only by convention."""

    name: str
    quotas: Mapping[str, int] = field(default_factory=dict)  # channel → quota; empty: recall's defaults
    recall_candidates: int = 500  # candidates recall returns after its merge
    prerank_keep: int = 200  # candidates the pre-ranker keeps for the ranker; 0: no pre-rank
    fusion: Fusion = field(default_factory=Fusion)
    rerank_method: RerankMethod = "mmr"
    theta: float = 0.7  # reward vs diversity: 1 is pure reward order
    window: int = 5  # how many recent picks a candidate is compared with
    rules: RerankRules = field(default_factory=lambda: RerankRules(max_consecutive_author=2))
    default_count: int = 20  # items returned when the request leaves count at 0
    max_count: int = 100
    pipeline: tuple[str, ...] = PIPELINE_STAGES  # the request's stages, in order
    new_items: NewItemTraffic = field(default_factory=NewItemTraffic)  # off unless slots > 0

    def selector(self) -> Selector:
        """The rerank stage this scene asks for."""
        return selector_for(self.rerank_method, self.theta, self.window, self.rules)

    def resolve_count(self, requested: int) -> int:
        """A request's `count`: 0 means the scene's default; otherwise 1 … `max_count`."""
        if requested == 0:
            return self.default_count
        if not 1 <= requested <= self.max_count:
            raise InvalidArgument("count", f"must be in 1 … {self.max_count} for scene {self.name!r}")
        return requested


DEFAULT_SCENE = Scene(DEFAULT_SCENE_NAME)


def scene_named(scenes: Mapping[str, Scene], name: str) -> Scene:
    """The scene a request names (`default` when empty); an unknown name is the client's
    mistake."""
    scene = scenes.get(name or DEFAULT_SCENE_NAME)
    if scene is None:
        raise InvalidArgument("scene", f"unknown scene {name!r} (known: {', '.join(sorted(scenes))})")
    return scene


def scenes_from_json(obj: object, *, channels: Collection[str] | None = None) -> dict[str, Scene]:
    """Scenes from `{"scenes": {name: overrides}}` (see the module docstring), always with a
    `default`. `channels`: the quota names allowed (default: every recall channel)."""
    known_channels = _channels(channels)
    top = _object(obj, "")
    _only(top, ("scenes",), "")
    declared = _object(top.get("scenes", {}), "scenes")
    default = apply_overrides(
        DEFAULT_SCENE, declared.get(DEFAULT_SCENE_NAME, {}), f"scenes.{DEFAULT_SCENE_NAME}", known_channels
    )
    scenes = {DEFAULT_SCENE_NAME: default}
    for name, overrides in declared.items():
        if name == DEFAULT_SCENE_NAME:
            continue
        path = f"scenes.{name}"
        if not _NAME.match(name):
            raise ConfigError(path, "scene names are 1–64 letters, digits, '_', '.' or '-'")
        scenes[name] = apply_overrides(replace(default, name=name), overrides, path, known_channels)
    return scenes


def load_scenes(path: Path | str, *, channels: Collection[str] | None = None) -> dict[str, Scene]:
    return scenes_from_json(_read_json(path), channels=channels)


def apply_overrides(
    scene: Scene, overrides: object, path: str, channels: Collection[str] | None = None
) -> Scene:
    """`scene` with `overrides` (the scene JSON schema, every field optional) applied and
    validated; errors name `path` + the field."""
    known_channels = _channels(channels)
    obj = _object(overrides, path)
    _only(
        obj,
        ("quotas", "recall_candidates", "prerank_keep", "fusion", "rerank", "count", "pipeline", "new_items"),
        path,
    )
    changes: dict[str, Any] = {}
    if "quotas" in obj:
        quotas = dict(scene.quotas)
        for channel, quota in _object(obj["quotas"], f"{path}.quotas").items():
            if channel not in known_channels:
                raise ConfigError(
                    f"{path}.quotas.{channel}",
                    f"unknown channel (known: {', '.join(sorted(known_channels))})",
                )
            quotas[channel] = _integer(quota, f"{path}.quotas.{channel}", minimum=0)
        changes["quotas"] = quotas
    if "recall_candidates" in obj:
        changes["recall_candidates"] = _integer(obj["recall_candidates"], f"{path}.recall_candidates", 1)
    if "prerank_keep" in obj:
        changes["prerank_keep"] = _integer(obj["prerank_keep"], f"{path}.prerank_keep", 0)
    if "fusion" in obj:
        changes["fusion"] = _fusion(scene.fusion, obj["fusion"], f"{path}.fusion")
    if "rerank" in obj:
        changes.update(_rerank(scene, obj["rerank"], f"{path}.rerank"))
    if "pipeline" in obj:
        changes["pipeline"] = _pipeline(obj["pipeline"], f"{path}.pipeline")
    if "new_items" in obj:
        changes["new_items"] = _new_items(scene.new_items, obj["new_items"], f"{path}.new_items")
    if "count" in obj:
        counts = _object(obj["count"], f"{path}.count")
        _only(counts, ("default", "max"), f"{path}.count")
        if "default" in counts:
            changes["default_count"] = _integer(counts["default"], f"{path}.count.default", 1)
        if "max" in counts:
            changes["max_count"] = _integer(counts["max"], f"{path}.count.max", 1)
    result = replace(scene, **changes)
    if result.prerank_keep > result.recall_candidates:
        raise ConfigError(
            f"{path}.prerank_keep",
            f"must be at most recall_candidates ({result.recall_candidates}), got {result.prerank_keep}",
        )
    if result.default_count > result.max_count:
        raise ConfigError(
            f"{path}.count.default",
            f"must be at most count.max ({result.max_count}), got {result.default_count}",
        )
    return result


def _pipeline(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(stage, str) for stage in value):
        raise ConfigError(path, f"expected a list of stage names ({', '.join(PIPELINE_STAGES)})")
    unknown = [stage for stage in value if stage not in PIPELINE_STAGES]
    if unknown:
        raise ConfigError(path, f"unknown stages {unknown} (known: {', '.join(PIPELINE_STAGES)})")
    if not value or value[0] != "recall":
        raise ConfigError(path, "must start with recall")
    stages = tuple(value)
    if len(set(stages)) != len(stages) or list(stages) != [s for s in PIPELINE_STAGES if s in stages]:
        raise ConfigError(path, f"stages once each, in the order {', '.join(PIPELINE_STAGES)}")
    return stages


def _new_items(base: NewItemTraffic, value: object, path: str) -> NewItemTraffic:
    obj = _object(value, path)
    _only(obj, ("slots", "max_age", "boost", "boost_half_life_impressions"), path)
    changes: dict[str, Any] = {}
    if "slots" in obj:
        changes["slots"] = _integer(obj["slots"], f"{path}.slots", 0)
    if "max_age" in obj:
        changes["max_age_seconds"] = _duration(obj["max_age"], f"{path}.max_age")
    if "boost" in obj:
        boost = _number(obj["boost"], f"{path}.boost")
        if boost < 0:
            raise ConfigError(f"{path}.boost", f"must be a number ≥ 0, got {boost}")
        changes["boost"] = boost
    if "boost_half_life_impressions" in obj:
        half_life = _number(obj["boost_half_life_impressions"], f"{path}.boost_half_life_impressions")
        if half_life <= 0:
            raise ConfigError(f"{path}.boost_half_life_impressions", f"must be a number > 0, got {half_life}")
        changes["boost_half_life_impressions"] = half_life
    return replace(base, **changes)


def _duration(value: object, path: str) -> float:
    """Seconds, from a number or a string of a number and a unit: "45s", "90m", "12h", "3d"."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ConfigError(
                path, f'must be seconds or a duration such as "90m", "12h", "3d", got {value!r}'
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        seconds = _number(value, path)
    if seconds <= 0:
        raise ConfigError(path, f"must be a duration > 0, got {value!r}")
    return seconds


def _fusion(base: Fusion, value: object, path: str) -> Fusion:
    obj = _object(value, path)
    _only(obj, ("method", "weights", "exponents"), path)
    method = base.method
    if "method" in obj:
        if obj["method"] not in FUSION_METHODS:
            raise ConfigError(
                f"{path}.method", f"must be one of {', '.join(FUSION_METHODS)}, got {obj['method']!r}"
            )
        method = cast(FusionMethod, obj["method"])
    weights = dict(base.weights)
    for task, weight in _object(obj.get("weights", {}), f"{path}.weights").items():
        weights[task] = _number(weight, f"{path}.weights.{task}")
    exponents = dict(base.exponents)
    for task, exponent in _object(obj.get("exponents", {}), f"{path}.exponents").items():
        exponents[task] = _number(exponent, f"{path}.exponents.{task}")
    return Fusion(method, weights, exponents)


def _rerank(scene: Scene, value: object, path: str) -> dict[str, Any]:
    obj = _object(value, path)
    _only(obj, ("method", "theta", "window", "rules"), path)
    changes: dict[str, Any] = {}
    if "method" in obj:
        if obj["method"] not in RERANK_METHODS:
            raise ConfigError(
                f"{path}.method", f"must be one of {', '.join(RERANK_METHODS)}, got {obj['method']!r}"
            )
        changes["rerank_method"] = obj["method"]
    if "theta" in obj:
        theta = _number(obj["theta"], f"{path}.theta")
        if not 0.0 <= theta <= 1.0:
            raise ConfigError(f"{path}.theta", f"must be a number in [0, 1], got {theta}")
        changes["theta"] = theta
    if "window" in obj:
        changes["window"] = _integer(obj["window"], f"{path}.window", 1)
    if "rules" in obj:
        rules = _object(obj["rules"], f"{path}.rules")
        names = tuple(spec.name for spec in fields(RerankRules))
        _only(rules, names, f"{path}.rules")
        try:
            changes["rules"] = replace(scene.rules, **rules)
        except ValueError as error:  # RerankRules names the field first: "first_screen: …"
            field_name, _, problem = str(error).partition(": ")
            raise ConfigError(f"{path}.rules.{field_name}", problem) from None
    return changes


# -- experiments ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    name: str
    share: float  # fraction of the experiment's users, the shares summing to 1
    overrides: Mapping[str, Any]  # scene JSON schema, applied over the scene


@dataclass(frozen=True)
class Experiment:
    name: str
    salt: str  # changing it reshuffles every user between arms
    scenes: tuple[str, ...]  # scenes whose requests it covers
    arms: tuple[Arm, ...]

    def bucket(self, user_id: str) -> float:
        """The user's stable point in [0, 1): xxh64 of "salt:user_id" over 2⁶⁴. The same in
        every process and release (not Python's randomised `hash`)."""
        return xxhash.xxh64_intdigest(f"{self.salt}:{user_id}".encode()) / 2.0**64

    def assign(self, user_id: str) -> Arm:
        """The arm whose cumulative share interval holds the user's bucket."""
        point = self.bucket(user_id)
        cumulative = 0.0
        for arm in self.arms:
            cumulative += arm.share
            if point < cumulative:
                return arm
        # Shares sum to 1 only up to rounding; the remainder belongs to the last arm with users.
        return next(arm for arm in reversed(self.arms) if arm.share > 0)


@dataclass(frozen=True)
class Assignment:
    """What a request runs with: the scene after the arm's overrides, and the labels for the
    answer and the metrics ("" when no experiment covers the scene)."""

    scene: Scene
    experiment: str = ""
    arm: str = ""


def scene_for(
    scene: Scene, arm: Arm, path: str | None = None, channels: Collection[str] | None = None
) -> Scene:
    """`scene` with the arm's overrides applied and validated."""
    return apply_overrides(scene, arm.overrides, path or f"arms.{arm.name}.overrides", channels)


class ExperimentConfig:
    """Experiments from JSON; a scene is covered by at most one experiment.

        {"experiments": {
            "rerank_dpp": {
                "salt": "rerank_dpp-2025-06",
                "scenes": ["home"],
                "arms": [
                    {"name": "control", "share": 0.5},
                    {"name": "dpp", "share": 0.5, "overrides": {"rerank": {"method": "dpp"}}}]}}}

    With `scenes`, every arm is applied to every scene it covers at load (so a bad override
    fails at start-up, not on a request) and the results are kept for `resolve`; without,
    overrides are checked against the built-in default scene only."""

    def __init__(
        self,
        experiments: Mapping[str, Experiment],
        scenes: Mapping[str, Scene] | None = None,
        channels: Collection[str] | None = None,
    ) -> None:
        self.experiments = dict(experiments)
        self._by_scene: dict[str, Experiment] = {}
        self._variants: dict[tuple[str, str], tuple[Scene, Scene]] = {}
        self._channels = _channels(channels)
        for experiment in self.experiments.values():
            path = f"experiments.{experiment.name}"
            for position, scene_name in enumerate(experiment.scenes):
                other = self._by_scene.get(scene_name)
                if other is not None:
                    raise ConfigError(
                        f"{path}.scenes[{position}]",
                        f"scene {scene_name!r} is already in experiment {other.name!r}",
                    )
                if scenes is not None and scene_name not in scenes:
                    raise ConfigError(
                        f"{path}.scenes[{position}]",
                        f"unknown scene {scene_name!r} (known: {', '.join(sorted(scenes))})",
                    )
                self._by_scene[scene_name] = experiment
            for position, arm in enumerate(experiment.arms):
                arm_path = f"{path}.arms[{position}].overrides"
                bases = (
                    [scenes[name] for name in experiment.scenes] if scenes is not None else [DEFAULT_SCENE]
                )
                for base in bases:
                    variant = scene_for(base, arm, arm_path, self._channels)
                    if scenes is not None:
                        self._variants[(base.name, arm.name)] = (base, variant)

    @classmethod
    def from_json(
        cls, obj: object, scenes: Mapping[str, Scene] | None = None, channels: Collection[str] | None = None
    ) -> ExperimentConfig:
        top = _object(obj, "")
        _only(top, ("experiments",), "")
        experiments = {
            name: _experiment(name, value, f"experiments.{name}")
            for name, value in _object(top.get("experiments", {}), "experiments").items()
        }
        return cls(experiments, scenes, channels)

    @classmethod
    def load(
        cls,
        path: Path | str,
        scenes: Mapping[str, Scene] | None = None,
        channels: Collection[str] | None = None,
    ) -> ExperimentConfig:
        return cls.from_json(_read_json(path), scenes, channels)

    @classmethod
    def empty(cls) -> ExperimentConfig:
        return cls({})

    def variant_scenes(self) -> list[Scene]:
        """Every (scene, arm) variant built at load (empty when loaded without scenes)."""
        return [variant for _, variant in self._variants.values()]

    def experiment_for(self, scene_name: str) -> Experiment | None:
        return self._by_scene.get(scene_name)

    def resolve(self, scene: Scene, user_id: str) -> Assignment:
        """The scene this user's request runs with, and its experiment and arm."""
        experiment = self._by_scene.get(scene.name)
        if experiment is None:
            return Assignment(scene)
        arm = experiment.assign(user_id)
        cached = self._variants.get((scene.name, arm.name))
        if cached is not None and cached[0] is scene:
            variant = cached[1]
        else:
            variant = scene_for(scene, arm, f"experiments.{experiment.name}.arms.{arm.name}", self._channels)
        return Assignment(variant, experiment.name, arm.name)


def _experiment(name: str, value: object, path: str) -> Experiment:
    if not _NAME.match(name):
        raise ConfigError(path, "experiment names are 1–64 letters, digits, '_', '.' or '-'")
    obj = _object(value, path)
    _only(obj, ("salt", "scenes", "arms"), path)
    salt = obj.get("salt")
    if not isinstance(salt, str) or not salt:
        raise ConfigError(f"{path}.salt", f"required: a non-empty string, got {salt!r}")
    scenes = obj.get("scenes")
    if not isinstance(scenes, list) or not scenes:
        raise ConfigError(f"{path}.scenes", f"required: a non-empty list of scene names, got {scenes!r}")
    for position, scene in enumerate(scenes):
        if not isinstance(scene, str) or not _NAME.match(scene):
            raise ConfigError(f"{path}.scenes[{position}]", f"must be a scene name, got {scene!r}")
    if len(set(scenes)) != len(scenes):
        raise ConfigError(f"{path}.scenes", "lists a scene twice")
    raw_arms = obj.get("arms")
    if not isinstance(raw_arms, list) or not raw_arms:
        raise ConfigError(f"{path}.arms", f"required: a non-empty list of arms, got {raw_arms!r}")
    arms: list[Arm] = []
    for position, raw in enumerate(raw_arms):
        arm_path = f"{path}.arms[{position}]"
        arm = _object(raw, arm_path)
        _only(arm, ("name", "share", "overrides"), arm_path)
        arm_name = arm.get("name")
        if not isinstance(arm_name, str) or not _NAME.match(arm_name):
            raise ConfigError(
                f"{arm_path}.name", f"required: 1–64 letters, digits, '_', '.' or '-', got {arm_name!r}"
            )
        if any(existing.name == arm_name for existing in arms):
            raise ConfigError(f"{arm_path}.name", f"arm {arm_name!r} appears twice")
        share = _number(arm.get("share"), f"{arm_path}.share")
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"{arm_path}.share", f"must be in [0, 1], got {share}")
        arms.append(Arm(arm_name, share, _object(arm.get("overrides", {}), f"{arm_path}.overrides")))
    total = math.fsum(arm.share for arm in arms)
    if abs(total - 1.0) > _SHARE_TOLERANCE:
        raise ConfigError(f"{path}.arms", f"shares must sum to 1, got {total:.12g}")
    return Experiment(name, salt, tuple(scenes), tuple(arms))


# -- JSON helpers --------------------------------------------------------------------------
def _read_json(path: Path | str) -> object:
    try:
        return cast(object, json.loads(Path(path).read_text(encoding="utf-8")))
    except json.JSONDecodeError as error:
        raise ConfigError(str(path), f"not valid JSON: {error}") from None


def _channels(channels: Collection[str] | None) -> Collection[str]:
    if channels is not None:
        return channels
    # Imported here: serving_model brings onnxruntime, which a caller passing its own list avoids.
    from recsys.serving_model import ALL_CHANNELS

    return ALL_CHANNELS


def _object(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(path or "(top level)", f"must be a JSON object, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(path or "(top level)", f"keys must be strings, got {key!r}")
    return dict(value)


def _only(obj: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    for key in obj:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise ConfigError(where, f"unknown field (allowed: {', '.join(allowed)})")


def _integer(value: object, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(path, f"must be an integer ≥ {minimum}, got {value!r}")
    return value


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(path, f"must be a finite number, got {value!r}")
    return float(value)
