"""The supervisor: ZeroMQ front end, container discovery, workers, hooks and metrics."""
