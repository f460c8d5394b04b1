"""The gateway: the public Recommend and ReportEvents API (gRPC and HTTP/JSON)."""
