"""``fastckpt serve``: an optional machine-wide checkpoint cache that outlives worker processes.

- ``fastckpt.serve.daemon``: the daemon (sealed memfds under a DRAM budget, whole-checkpoint LRU,
  single flight, peer credential checks), run by ``fastckpt serve``;
- ``fastckpt.serve.protocol``: the framed, versioned, validated wire protocol (torch-free);
- ``fastckpt.serve.client``: ``Client``, one connection whose peer is checked first (the load
  core's daemon byte source, ``fastckpt.loader.daemonsource``, and ``fastckpt cache
  ls|prefetch|evict|stats`` use it).

See docs/serve.md. Importing this package imports nothing heavy.
"""

from __future__ import annotations
