"""The math of the project, pure torch: policy losses, advantages, KL integrands, aggregation.

Nothing here logs, reads configs or calls ``.item()``; metrics are returned detached.
"""
