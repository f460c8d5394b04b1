"""onnxruntime sessions for the exported models, fed by input name.

Sessions run with one intra-op thread: the services scale with one process per core,
and several threads per session would only fight over the same cores."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from recsys.features import Inputs

log = logging.getLogger("recsys.models")


def session_options(threads: int = 1) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxModel:
    """One exported model: named inputs in, named outputs out."""

    def __init__(self, path: Path | bytes, threads: int = 1) -> None:
        source = str(path) if isinstance(path, Path) else path
        self.session = ort.InferenceSession(
            source, session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.input_names = tuple(value.name for value in self.session.get_inputs())
        self.output_names = tuple(value.name for value in self.session.get_outputs())

    def run(self, inputs: Inputs) -> dict[str, npt.NDArray[Any]]:
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise ValueError(f"inputs: missing {missing} (model takes {list(self.input_names)})")
        feed = {name: inputs[name] for name in self.input_names}
        outputs = self.session.run(list(self.output_names), feed)
        return {name: np.asarray(value) for name, value in zip(self.output_names, outputs, strict=True)}


class DeferredOnnxModel(OnnxModel):
    """An OnnxModel whose session is created on first use. For a process that holds a
    version but never runs this model (the gateway and the user tower, the ranker): the
    session's memory is never spent. Everything an OnnxModel has is reached through the
    loaded one, so a caller cannot tell the difference except in memory and first latency."""

    def __init__(self, path: Path, threads: int = 1, *, expected: bool = False) -> None:
        # No session yet: see _loaded. `expected`: a first use is the normal case (the item
        # tower, needed once items are upserted), logged as information, not as a warning.
        self._path = path
        self._threads = threads
        self._expected = expected
        self._model: OnnxModel | None = None
        self._lock = threading.Lock()

    def _loaded(self) -> OnnxModel:
        with self._lock:
            if self._model is None:
                log.log(
                    logging.INFO if self._expected else logging.WARNING,
                    "loading a deferred ONNX model on first use",
                    extra={"path": str(self._path)},
                )
                self._model = OnnxModel(self._path, self._threads)
            return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def __getattr__(self, name: str) -> Any:
        # Only for attributes not found normally: the session and the input and output names.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._loaded(), name)
