"""Scenes and experiments: parsing with errors naming the field, overrides, stable arms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from recsys.errors import InvalidArgument
from recsys.scenes import (
    DEFAULT_SCENE,
    Arm,
    ConfigError,
    Experiment,
    ExperimentConfig,
    Scene,
    apply_overrides,
    load_scenes,
    scene_for,
    scene_named,
    scenes_from_json,
)
from recsys.stages.fusion import Fusion
from recsys.stages.rerank import DppSelector, MmrSelector, NewItemTraffic, RerankRules, TopKSelector

ROOT = Path(__file__).resolve().parents[2]
CHANNELS = ("itemcf", "swing", "ease", "two_tower", "geo", "author", "cache", "popular")


def scenes(obj: dict[str, Any]) -> dict[str, Scene]:
    return scenes_from_json({"scenes": obj}, channels=CHANNELS)


# -- scenes --------------------------------------------------------------------------------
def test_default_scene_is_built_in_and_always_present() -> None:
    parsed = scenes_from_json({}, channels=CHANNELS)
    assert parsed == {"default": DEFAULT_SCENE}
    assert isinstance(DEFAULT_SCENE.selector(), MmrSelector)


def test_scenes_start_from_the_resolved_default_and_override_field_by_field() -> None:
    parsed = scenes(
        {
            "default": {"quotas": {"itemcf": 100, "popular": 50}, "rerank": {"theta": 0.8}},
            "home": {
                "quotas": {"itemcf": 300, "geo": 0},
                "fusion": {"weights": {"share": 0.5}},
                "rerank": {"method": "dpp", "window": 8, "rules": {"max_consecutive_category": 2}},
                "count": {"max": 50},
            },
        }
    )
    default, home = parsed["default"], parsed["home"]
    assert default.quotas == {"itemcf": 100, "popular": 50}
    assert default.theta == 0.8
    assert home.name == "home"
    assert home.quotas == {"itemcf": 300, "popular": 50, "geo": 0}  # key by key
    assert home.fusion == Fusion("weighted_sum", {"like": 1.0, "share": 0.5}, {})
    assert home.theta == 0.8  # inherited from default
    assert home.rules == RerankRules(max_consecutive_category=2, max_consecutive_author=2)
    assert (home.default_count, home.max_count) == (20, 50)
    selector = home.selector()
    assert isinstance(selector, DppSelector)
    assert (selector.theta, selector.window) == (0.8, 8)


def test_new_item_traffic_is_off_by_default_and_overrides_field_by_field() -> None:
    parsed = scenes(
        {
            "default": {"new_items": {"max_age": "12h", "boost_half_life_impressions": 50}},
            "home": {"new_items": {"slots": 2, "boost": 0.3}},
            "seconds": {"new_items": {"slots": 1, "max_age": 3600}},
            "days": {"new_items": {"slots": 1, "max_age": " 1.5d "}},
        }
    )
    assert DEFAULT_SCENE.new_items == NewItemTraffic()
    assert not DEFAULT_SCENE.new_items.active
    assert parsed["default"].new_items == NewItemTraffic(0, 43_200.0, 0.0, 50.0)
    assert parsed["home"].new_items == NewItemTraffic(2, 43_200.0, 0.3, 50.0)  # the rest from default
    assert parsed["seconds"].new_items.max_age_seconds == 3600.0
    assert parsed["days"].new_items.max_age_seconds == 129_600.0
    arm = Arm("treatment", 0.5, {"new_items": {"slots": 3}})
    assert scene_for(parsed["home"], arm, channels=CHANNELS).new_items == NewItemTraffic(
        3, 43_200.0, 0.3, 50.0
    )


def test_experiments_list_their_variants_for_the_new_item_horizon() -> None:
    parsed = scenes({"home": {"new_items": {"max_age": "2h"}}})
    config = ExperimentConfig.from_json(
        {
            "experiments": {
                "cold": {
                    "salt": "s",
                    "scenes": ["home"],
                    "arms": [
                        {"name": "control", "share": 0.5},
                        {"name": "treatment", "share": 0.5, "overrides": {"new_items": {"slots": 2}}},
                    ],
                }
            }
        },
        parsed,
        channels=CHANNELS,
    )
    variants = {scene.new_items.slots: scene.new_items.max_age_seconds for scene in config.variant_scenes()}
    assert variants == {0: 7200.0, 2: 7200.0}
    assert ExperimentConfig.empty().variant_scenes() == []


def test_scene_without_diversity_uses_top_k() -> None:
    related = scenes({"related": {"rerank": {"method": "none", "rules": {"max_consecutive_author": None}}}})
    selector = related["related"].selector()
    assert isinstance(selector, TopKSelector)
    assert not selector.rules.active


def test_example_scene_file_loads() -> None:
    parsed = load_scenes(ROOT / "deploy" / "scenes.example.json", channels=CHANNELS)
    assert set(parsed) == {"default", "home", "related"}
    assert parsed["home"].rules.first_screen_max_per_author == 2


def test_scene_named_and_resolve_count_raise_request_errors() -> None:
    parsed = scenes({"home": {"count": {"default": 10, "max": 30}}})
    assert scene_named(parsed, "") is parsed["default"]
    assert scene_named(parsed, "home") is parsed["home"]
    with pytest.raises(InvalidArgument) as error:
        scene_named(parsed, "nope")
    assert error.value.field == "scene"
    home = parsed["home"]
    assert home.resolve_count(0) == 10
    assert home.resolve_count(30) == 30
    for bad in (-1, 31):
        with pytest.raises(InvalidArgument) as error:
            home.resolve_count(bad)
        assert error.value.field == "count"


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        ({"home": {"rerank": {"theta": 1.5}}}, "scenes.home.rerank.theta"),
        ({"home": {"rerank": {"theta": "high"}}}, "scenes.home.rerank.theta"),
        ({"home": {"rerank": {"method": "random"}}}, "scenes.home.rerank.method"),
        ({"home": {"rerank": {"window": 0}}}, "scenes.home.rerank.window"),
        ({"home": {"rerank": {"rules": {"first_screen": -1}}}}, "scenes.home.rerank.rules.first_screen"),
        (
            {"home": {"rerank": {"rules": {"max_consecutive_author": 0}}}},
            "scenes.home.rerank.rules.max_consecutive_author",
        ),
        ({"home": {"rerank": {"rules": {"max_run": 2}}}}, "scenes.home.rerank.rules.max_run"),
        ({"home": {"quotas": {"itemcf": -1}}}, "scenes.home.quotas.itemcf"),
        ({"home": {"quotas": {"itemfc": 10}}}, "scenes.home.quotas.itemfc"),
        ({"home": {"quotas": [1, 2]}}, "scenes.home.quotas"),
        ({"home": {"recall_candidates": 0}}, "scenes.home.recall_candidates"),
        ({"home": {"recall_candidates": 100, "prerank_keep": 200}}, "scenes.home.prerank_keep"),
        ({"home": {"fusion": {"method": "max"}}}, "scenes.home.fusion.method"),
        ({"home": {"fusion": {"weights": {"like": None}}}}, "scenes.home.fusion.weights.like"),
        ({"home": {"count": {"default": 0}}}, "scenes.home.count.default"),
        ({"home": {"count": {"default": 30, "max": 20}}}, "scenes.home.count.default"),
        ({"home": {"count": {"min": 1}}}, "scenes.home.count.min"),
        ({"home": {"colour": "red"}}, "scenes.home.colour"),
        ({"home": 3}, "scenes.home"),
        ({"bad name!": {}}, "scenes.bad name!"),
        ({"default": {"rerank": {"theta": 2}}}, "scenes.default.rerank.theta"),
        ({"home": {"pipeline": ["rank", "recall"]}}, "scenes.home.pipeline"),
        ({"home": {"pipeline": ["recall", "rerank", "rank"]}}, "scenes.home.pipeline"),
        ({"home": {"pipeline": ["recall", "rank", "rank"]}}, "scenes.home.pipeline"),
        ({"home": {"pipeline": ["recall", "shuffle"]}}, "scenes.home.pipeline"),
        ({"home": {"pipeline": "recall"}}, "scenes.home.pipeline"),
        ({"home": {"new_items": {"slots": -1}}}, "scenes.home.new_items.slots"),
        ({"home": {"new_items": {"slots": 1.5}}}, "scenes.home.new_items.slots"),
        ({"home": {"new_items": {"max_age": "3 weeks"}}}, "scenes.home.new_items.max_age"),
        ({"home": {"new_items": {"max_age": 0}}}, "scenes.home.new_items.max_age"),
        ({"home": {"new_items": {"max_age": "0h"}}}, "scenes.home.new_items.max_age"),
        ({"home": {"new_items": {"boost": -1}}}, "scenes.home.new_items.boost"),
        ({"home": {"new_items": {"boost": "big"}}}, "scenes.home.new_items.boost"),
        (
            {"home": {"new_items": {"boost_half_life_impressions": 0}}},
            "scenes.home.new_items.boost_half_life_impressions",
        ),
        ({"home": {"new_items": {"share": 0.1}}}, "scenes.home.new_items.share"),
        ({"home": {"new_items": 2}}, "scenes.home.new_items"),
    ],
)
def test_bad_scene_config_names_the_json_path(obj: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as error:
        scenes(obj)
    assert error.value.path == path
    assert str(error.value).startswith(f"{path}: ")


def test_config_error_is_a_value_error_with_a_readable_message() -> None:
    with pytest.raises(
        ValueError, match=r"^scenes\.home\.rerank\.theta: must be a number in \[0, 1\], got 1.5$"
    ):
        scenes({"home": {"rerank": {"theta": 1.5}}})
    with pytest.raises(ConfigError, match=r"^extra: unknown field"):
        scenes_from_json({"scenes": {}, "extra": 1}, channels=CHANNELS)


def test_unreadable_json_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "scenes.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=r"scenes\.json: not valid JSON"):
        load_scenes(broken, channels=CHANNELS)


def test_quota_names_default_to_the_recall_channels() -> None:
    assert scenes_from_json({"scenes": {"home": {"quotas": {"swing": 5}}}})["home"].quotas == {"swing": 5}
    with pytest.raises(ConfigError) as error:
        scenes_from_json({"scenes": {"home": {"quotas": {"nope": 5}}}})
    assert error.value.path == "scenes.home.quotas.nope"


# -- experiments ---------------------------------------------------------------------------
def experiment(*shares: float, salt: str = "salt-1") -> Experiment:
    arms = tuple(Arm(f"arm{position}", share, {}) for position, share in enumerate(shares))
    return Experiment("exp", salt, ("home",), arms)


def test_assignment_is_stable_across_calls_and_objects() -> None:
    first, second = experiment(0.5, 0.5), experiment(0.5, 0.5)
    users = [f"user-{number}" for number in range(500)]
    assert [first.assign(user).name for user in users] == [second.assign(user).name for user in users]
    assert [first.assign(user).name for user in users] == [first.assign(user).name for user in users]


def test_assignment_is_stable_across_processes_and_pinned() -> None:
    users = [f"user-{number}" for number in range(50)]
    code = (
        "from recsys.scenes import Arm, Experiment\n"
        "e = Experiment('exp', 'salt-1', ('home',), (Arm('arm0', 0.3, {}), Arm('arm1', 0.7, {})))\n"
        f"print(','.join(e.assign(u).name for u in {users!r}))\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    here = experiment(0.3, 0.7)
    assert other.split(",") == [here.assign(user).name for user in users]
    # xxh64("salt-1:user-0", seed 0) = 0xb0d59aed485c866e, over 2⁶⁴: a change of hash, seed or
    # key format would silently reshuffle every running experiment.
    assert here.bucket("user-0") == 0xB0D59AED485C866E / 2**64


def test_shares_are_respected_over_many_users() -> None:
    shares = (0.1, 0.3, 0.6)
    counts = dict.fromkeys(("arm0", "arm1", "arm2"), 0)
    split = experiment(*shares)
    for number in range(100_000):
        counts[split.assign(str(number)).name] += 1
    for name, share in zip(counts, shares, strict=True):
        assert counts[name] / 100_000 == pytest.approx(share, abs=0.01)


def test_a_different_salt_reshuffles_users() -> None:
    users = [f"u{number}" for number in range(2_000)]
    first = [experiment(0.5, 0.5, salt="a").assign(user).name for user in users]
    second = [experiment(0.5, 0.5, salt="b").assign(user).name for user in users]
    moved = sum(a != b for a, b in zip(first, second, strict=True)) / len(users)
    assert moved == pytest.approx(0.5, abs=0.05)  # independent halves: about half move


def test_zero_share_arms_get_nobody() -> None:
    paused = experiment(0.0, 1.0, 0.0)
    assert {paused.assign(str(number)).name for number in range(2_000)} == {"arm1"}


def test_scene_for_applies_and_validates_arm_overrides() -> None:
    home = scenes({"home": {"quotas": {"itemcf": 300, "swing": 100}}})["home"]
    arm = Arm(
        "b", 0.5, {"rerank": {"method": "dpp"}, "fusion": {"weights": {"like": 2}}, "quotas": {"itemcf": 400}}
    )
    variant = scene_for(home, arm, channels=CHANNELS)
    assert variant.name == "home"
    assert variant.rerank_method == "dpp"
    assert variant.fusion.weights == {"like": 2.0}
    assert variant.quotas == {"itemcf": 400, "swing": 100}
    assert home.quotas == {"itemcf": 300, "swing": 100}  # the base scene is unchanged
    with pytest.raises(ConfigError) as error:
        scene_for(home, Arm("b", 0.5, {"rerank": {"theta": -1}}), channels=CHANNELS)
    assert error.value.path == "arms.b.overrides.rerank.theta"
    assert apply_overrides(home, {}, "x", CHANNELS) == home


EXAMPLE = ROOT / "deploy" / "experiments.example.json"


def test_example_experiment_file_loads_and_resolves() -> None:
    parsed = load_scenes(ROOT / "deploy" / "scenes.example.json", channels=CHANNELS)
    config = ExperimentConfig.load(EXAMPLE, parsed, channels=CHANNELS)
    rerank = config.experiment_for("home")
    assert rerank is not None
    assert [arm.name for arm in rerank.arms] == ["control", "dpp", "like_heavy"]
    assert config.experiment_for("related") is None
    seen: dict[str, Scene] = {}
    for number in range(300):
        assignment = config.resolve(parsed["home"], f"user-{number}")
        assert assignment.experiment == "home_rerank"
        assert assignment.arm == rerank.assign(f"user-{number}").name
        seen[assignment.arm] = assignment.scene
    assert set(seen) == {"control", "dpp", "like_heavy"}
    assert seen["control"] == parsed["home"]
    assert seen["dpp"].rerank_method == "dpp"
    assert (seen["dpp"].theta, seen["dpp"].window) == (0.6, 8)
    assert seen["like_heavy"].fusion.weights == {"like": 2.0}
    assert seen["like_heavy"].quotas["itemcf"] == 400
    outside = config.resolve(parsed["related"], "user-1")
    assert (outside.scene, outside.experiment, outside.arm) == (parsed["related"], "", "")


def test_experiments_load_without_scenes_checking_overrides_against_the_default() -> None:
    config = ExperimentConfig.load(EXAMPLE, channels=CHANNELS)
    assignment = config.resolve(DEFAULT_SCENE, "someone")
    assert (assignment.experiment, assignment.arm) == ("", "")
    home = Scene("home")
    assert config.resolve(home, "someone").experiment == "home_rerank"


def base_experiment() -> dict[str, Any]:
    return {
        "salt": "s",
        "scenes": ["home"],
        "arms": [
            {"name": "a", "share": 0.5},
            {"name": "b", "share": 0.5, "overrides": {"rerank": {"theta": 0.2}}},
        ],
    }


def with_change(path: list[str | int], value: object) -> dict[str, Any]:
    root: Any = base_experiment()
    target = root
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return {"experiments": {"exp": root}}


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        (with_change(["arms", 1, "share"], 0.4), "experiments.exp.arms"),
        (with_change(["arms", 1, "share"], 1.5), "experiments.exp.arms[1].share"),
        (with_change(["arms", 1, "share"], "half"), "experiments.exp.arms[1].share"),
        (with_change(["arms", 1, "name"], "a"), "experiments.exp.arms[1].name"),
        (with_change(["arms", 1, "name"], ""), "experiments.exp.arms[1].name"),
        (
            with_change(["arms", 1, "overrides"], {"rerank": {"method": "x"}}),
            "experiments.exp.arms[1].overrides.rerank.method",
        ),
        (with_change(["arms", 0, "weight"], 1), "experiments.exp.arms[0].weight"),
        (with_change(["arms"], []), "experiments.exp.arms"),
        (with_change(["salt"], ...), "experiments.exp.salt"),
        (with_change(["scenes"], []), "experiments.exp.scenes"),
        (with_change(["scenes"], ["home", "home"]), "experiments.exp.scenes"),
        (with_change(["scenes"], ["nope"]), "experiments.exp.scenes[0]"),
        (with_change(["start"], "today"), "experiments.exp.start"),
        (
            {"experiments": {"exp": base_experiment(), "exp2": base_experiment()}},
            "experiments.exp2.scenes[0]",
        ),
        ({"experiments": []}, "experiments"),
    ],
)
def test_bad_experiment_config_names_the_field(obj: dict[str, Any], path: str) -> None:
    known = scenes({"home": {}})
    with pytest.raises(ConfigError) as error:
        ExperimentConfig.from_json(obj, known, channels=CHANNELS)
    assert error.value.path == path


def test_shares_summing_to_one_up_to_rounding_are_accepted(tmp_path: Path) -> None:
    thirds = base_experiment()
    thirds["arms"] = [{"name": name, "share": 1 / 3} for name in ("a", "b", "c")]
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps({"experiments": {"thirds": thirds}}))
    config = ExperimentConfig.load(path, channels=CHANNELS)
    assert config.experiment_for("home") is not None
    assert ExperimentConfig.empty().experiment_for("home") is None


def test_a_scene_declares_its_pipeline_as_data() -> None:
    declared = scenes({"fast": {"pipeline": ["recall", "blocklist", "rerank"]}})
    assert declared["default"].pipeline == ("recall", "blocklist", "rank", "rerank")
    assert declared["fast"].pipeline == ("recall", "blocklist", "rerank")
