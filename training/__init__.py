"""Offline training: TensorFlow/Keras models, CF indices, evaluation and ONNX export.

The only package that imports TensorFlow; the CLI imports it lazily, for the commands
that need it.
"""

import os as _os

# TensorFlow's C++ start-up chatter (CPU feature notices, oneDNN hints) is not for users of
# `recsys build`; real warnings and errors still show. Set before TensorFlow is imported.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
