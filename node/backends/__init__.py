"""Inference backends behind the node's gRPC service."""
