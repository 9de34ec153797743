"""The node agent: serves this machine's models over gRPC."""
