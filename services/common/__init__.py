"""The service kit: one way to build, run, observe and stop every recsys gRPC service.

- `server`: a grpc.aio server with health, reflection, metrics, request ids, error mapping,
  load shedding and graceful shutdown around an `Application`;
- `workers`: `--workers N` processes on one port (SO_REUSEPORT);
- `settings` / `cli`: settings read once from `RECSYS_<SERVICE>_*` and flags;
- `channels`: client channels for service-to-service calls;
- `metrics`, `logs`, `errors`, `deadline`.
"""
