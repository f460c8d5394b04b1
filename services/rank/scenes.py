"""Score fusion per scene, read once at start-up.

Rank reads the `fusion` object of each scene in the scenes JSON the gateway uses
(`{"scenes": {name: {"fusion": {"method": …, "weights": {…}, "exponents": {…}}, …}}}`; the
other fields belong to other stages and are ignored here). `default` starts from the model
version's own default fusion (`ServingModel.default_fusion`), every other scene from the
resolved `default`; weights and exponents override key by key. A version whose heads do not
cover a scene's tasks is refused at load (see `check`), so a call never meets that error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from recsys.errors import InvalidArgument
from recsys.serving_model import ServingModel
from recsys.stages.fusion import Fusion, FusionMethod

DEFAULT_SCENE = "default"
FUSION_METHODS: tuple[FusionMethod, ...] = ("weighted_sum", "weighted_product")


class SceneFusions:
    def __init__(self, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """`overrides`: scene name → its `fusion` JSON object (already validated)."""
        self._overrides = {name: dict(value) for name, value in (overrides or {}).items()}
        self._overrides.setdefault(DEFAULT_SCENE, {})
        self._resolved: dict[tuple[str, str], Fusion] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._overrides))

    @classmethod
    def from_json(cls, obj: object) -> SceneFusions:
        if not isinstance(obj, dict):
            raise ValueError(f"(top level): must be a JSON object, got {type(obj).__name__}")
        scenes = obj.get("scenes", {})
        if not isinstance(scenes, dict):
            raise ValueError(f"scenes: must be a JSON object, got {type(scenes).__name__}")
        overrides: dict[str, dict[str, Any]] = {}
        for name, scene in scenes.items():
            if not isinstance(scene, dict):
                raise ValueError(f"scenes.{name}: must be a JSON object, got {type(scene).__name__}")
            overrides[name] = _fusion_json(scene.get("fusion", {}), f"scenes.{name}.fusion")
        return cls(overrides)

    @classmethod
    def load(cls, path: Path | None) -> SceneFusions:
        if path is None:
            return cls()
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None
        return cls.from_json(data)

    def fusion(self, scene: str, model: ServingModel) -> Fusion:
        """The fusion a call's scene uses with this model version ("" = default)."""
        name = scene or DEFAULT_SCENE
        key = (model.version, name)
        fusion = self._resolved.get(key)
        if fusion is None:
            if name not in self._overrides:
                raise InvalidArgument("scene", f"unknown scene {name!r} (known: {', '.join(self.names)})")
            fusion = _apply(model.default_fusion(), self._overrides[DEFAULT_SCENE])
            if name != DEFAULT_SCENE:
                fusion = _apply(fusion, self._overrides[name])
            self._resolved[key] = fusion
        return fusion

    def check(self, model: ServingModel) -> None:
        """Every scene's fusion names only the version's heads (ValueError otherwise)."""
        for name in self.names:
            try:
                self.fusion(name, model).validate(model.spec.heads, f"scenes.{name}.fusion")
            except InvalidArgument as error:
                raise ValueError(str(error)) from None


def _apply(base: Fusion, overrides: Mapping[str, Any]) -> Fusion:
    return replace(
        base,
        method=overrides.get("method", base.method),
        weights={**base.weights, **overrides.get("weights", {})},
        exponents={**base.exponents, **overrides.get("exponents", {})},
    )


def _fusion_json(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{path}: must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - {"method", "weights", "exponents"})
    if unknown:
        raise ValueError(f"{path}.{unknown[0]}: unknown field (allowed: method, weights, exponents)")
    result: dict[str, Any] = {}
    if "method" in value:
        if value["method"] not in FUSION_METHODS:
            raise ValueError(
                f"{path}.method: must be one of {', '.join(FUSION_METHODS)}, got {value['method']!r}"
            )
        result["method"] = cast(FusionMethod, value["method"])
    for key in ("weights", "exponents"):
        if key not in value:
            continue
        entries = value[key]
        if not isinstance(entries, dict):
            raise ValueError(f"{path}.{key}: must be a JSON object, got {type(entries).__name__}")
        for task, number in entries.items():
            if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
                raise ValueError(f"{path}.{key}.{task}: must be a finite number, got {number!r}")
        result[key] = {task: float(number) for task, number in entries.items()}
    return result
