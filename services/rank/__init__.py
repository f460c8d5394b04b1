"""The rank service: multi-task ONNX scoring of a user's candidates with feature hydration,
micro-batching across concurrent calls, pre-rank and per-scene score fusion."""
