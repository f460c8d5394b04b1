"""Generated gRPC contract `recsys.v1` (see protos/recsys/v1). Do not edit."""
