"""Shared by nodes and coordinators: wire types, the error tree, the node client."""
