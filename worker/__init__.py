"""Processes that live inside containers: the zygote, per-container workers, spawners.

Nothing here imports pyzmq or prometheus: workers are forked small and single-threaded.
"""
