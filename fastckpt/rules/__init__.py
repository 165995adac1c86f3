"""Shared rules, one module each, torch-free and ``_core``-free (a test checks it).

- ``devices``: canonical device strings and prefix device maps.
- ``units``: byte sizes (parsing ``2GB`` / ``2GiB`` / ``2G``) and formatting them for people.
- ``carried``: which files of a checkpoint directory are carried over verbatim (not weights).

Every caller that needs one of these rules imports it from here instead of writing its own.
"""

from __future__ import annotations
