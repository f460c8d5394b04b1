"""Offline training: TensorFlow/Keras models, CF indices, evaluation and ONNX export.

The only package that imports TensorFlow; the CLI imports it lazily, for the commands
that need it.
"""
