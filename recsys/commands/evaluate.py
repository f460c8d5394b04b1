"""`recsys evaluate`: re-run the offline evaluation of a stored version with the serving
stages (no TensorFlow) and print the metrics."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="evaluate a stored version on its held-out part",
        description="Evaluate a model version on the held-out part saved with it, running the same "
        "stage code as the services.",
    )
    parser.add_argument("--store", default=os.environ.get("RECSYS_STORE", "./store"))
    parser.add_argument("--version", help="version to evaluate (default: CURRENT)")
    parser.add_argument("--json", action="store_true", help="print only the metrics JSON on stdout")
    parser.add_argument(
        "--scenes", help="scenes JSON (as `recsys serve gateway --scenes`) for the served-path figures"
    )
    parser.add_argument(
        "--scene", default="default", help="the scene whose path `served` evaluates (default: default)"
    )
    parser.set_defaults(handler=run)


def evaluate_version(
    store: str, version: str | None, scenes: str | None = None, scene: str = "default"
) -> dict[str, object]:
    from recsys.errors import UsageError
    from recsys.evaluation.cold_start import (
        COLD_START_SET,
        cold_start_set_from_json,
        evaluate_item_cold_start_seeds,
    )
    from recsys.evaluation.evaluator import KS, HeldOut, ease_lists, evaluate
    from recsys.onnx_models import OnnxModel
    from recsys.scenes import DEFAULT_SCENE, ConfigError, load_scenes
    from recsys.serving_model import ITEM_TOWER, ServingModel
    from recsys.store.reader import ModelStore

    model_store = ModelStore(store)
    name = version or model_store.current()
    if name is None:
        raise ValueError(f"--store: {model_store.path} has no current version (run `recsys build`)")
    path = model_store.version_path(name)
    manifest = model_store.manifest(name)
    model = ServingModel.load(path, version=name)

    def array(relative: str) -> np.ndarray:
        loaded: np.ndarray = np.load(path / relative, allow_pickle=False)
        return loaded

    heldout = HeldOut.from_pairs(array("eval/heldout_user.npy"), array("eval/heldout_item.npy"))
    ease_l2 = manifest.extra.get("ease_l2")
    ease = ease_lists(model.core, heldout, float(ease_l2), max(KS)) if ease_l2 is not None else None
    ranker_rows = None
    if model.ranker is not None:  # a retrieval-only version has no ranker to score
        labels = {head: array(f"eval/ranker_{head}.npy") for head in model.spec.heads}
        ranker_rows = (array("eval/ranker_user.npy"), array("eval/ranker_item.npy"), labels)
    chosen = DEFAULT_SCENE
    if scenes is not None:
        try:
            declared = load_scenes(scenes)
        except (OSError, ConfigError) as error:
            raise UsageError(f"--scenes: {error}") from None
        if scene not in declared:
            raise UsageError(f"--scene: {scene!r} is not in {scenes} (it has {', '.join(sorted(declared))})")
        chosen = declared[scene]
    elif scene != "default":
        raise UsageError("--scene: needs --scenes FILE")
    metrics = evaluate(model, heldout, scene=chosen, ease_lists=ease, ranker_rows=ranker_rows)
    if (path / COLD_START_SET).exists():  # a version built with new items held out (Book-Crossing)
        new = cold_start_set_from_json(json.loads((path / COLD_START_SET).read_text()))
        seed = int(manifest.training_config.get("seed", 0))
        metrics["item_cold_start"] = evaluate_item_cold_start_seeds(
            model, OnnxModel(path / ITEM_TOWER), new, seed=seed
        )
    return metrics


def run(args: argparse.Namespace) -> int:
    metrics = evaluate_version(args.store, args.version, args.scenes, args.scene)
    print(json.dumps(metrics, indent=None if args.json else 2, sort_keys=True))
    return 0
