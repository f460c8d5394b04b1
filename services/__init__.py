"""gRPC services: the shared service kit (`services.common`) and recall, rank, gateway."""
