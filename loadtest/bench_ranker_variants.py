"""onnxruntime time of the ranker architectures, per 200 rows, in one run: the ranker
before provenance features (the previous release's inputs), with them in the broadcast
formulation (Mul + ReduceSum: what was exported before), with them as exported now (MatMul,
see training/models/layers.py), and with the DIN attention option. Weights do not change
the arithmetic, so each variant is built untrained from a stored version's feature spec and
profile config, exported with the build's exporter, and timed on the same real rows (one
thread, as the rank service's inference thread runs it).

    python loadtest/bench_ranker_variants.py --store /tmp/store-ml [--rounds 2000]

Prints a markdown table for BENCHMARKS.md and a JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()

    from recsys.onnx_models import OnnxModel
    from recsys.serving_model import ServingModel
    from recsys.store import ModelStore
    from training.export import export_onnx
    from training.models.ranker import RankerConfig, build_ranker, serving_twin

    store = ModelStore(args.store)
    version = store.current()
    if version is None:
        parser.error(f"--store: {args.store} has no current version")
    model = ServingModel.load(store.version_path(version), version=version)
    stored = json.loads((store.version_path(version) / "manifest.json").read_text())["training_config"][
        "ranker"
    ]
    stored["expert_units"] = tuple(stored.get("expert_units", RankerConfig.expert_units))
    config = RankerConfig(
        **{key: value for key, value in stored.items() if key in RankerConfig.__dataclass_fields__}
    )
    rng = np.random.default_rng(0)
    user = int(rng.integers(model.core.users.n_users))
    query = model.query(user)
    items = rng.choice(model.core.catalogue.n_items, size=args.rows, replace=False)
    inputs = model.user_inputs(query)
    embedding = model.user_embeddings([inputs])[0]
    batch = model.ranker_batch(inputs, items, embedding)
    dot, din = dataclasses.replace(config, attention="dot"), dataclasses.replace(config, attention="din")
    variants: dict[str, tuple[Any, RankerConfig, bool]] = {
        "before: no provenance (previous release)": (
            dataclasses.replace(model.spec, provenance_channels=()),
            dot,
            False,
        ),
        "provenance, dot attention, broadcast Mul + ReduceSum (the previous export)": (
            model.spec,
            dot,
            False,
        ),
        "provenance, dot attention, MatMul (shipped)": (model.spec, dot, True),
        "provenance, DIN attention, MatMul": (model.spec, din, True),
    }
    results: dict[str, float] = {}
    for name, (spec, variant, matmul) in variants.items():
        keras_model = build_ranker(spec, variant)
        if matmul:
            keras_model = serving_twin(keras_model, spec, variant)
        onnx = OnnxModel(export_onnx(keras_model, spec.ranker_inputs()), threads=1)
        feed = {key: batch[key] for key in onnx.input_names}
        for _ in range(50):
            onnx.run(feed)
        best = float("inf")
        for _ in range(5):  # the best of five blocks: the box is shared and noisy
            started = time.perf_counter()
            for _ in range(args.rounds // 5):
                onnx.run(feed)
            best = min(best, (time.perf_counter() - started) / (args.rounds // 5))
        results[name] = best * 1e6
    baseline = next(iter(results.values()))
    print(
        f"\n{platform.node()}, {platform.processor() or platform.machine()}, store version {version}; "
        f"`python loadtest/bench_ranker_variants.py {' '.join(sys.argv[1:])}`\n"
    )
    print(f"| ranker | onnxruntime µs per {args.rows} rows (best of 5 blocks) | vs before |")
    print("| --- | --- | --- |")
    for name, micros in results.items():
        print(f"| {name} | {micros:.0f} | {micros / baseline:.2f}× |")
    print(json.dumps({"rows": args.rows, "microseconds": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
