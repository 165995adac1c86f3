"""The machine's cache daemon (``fastckpt serve``) as a byte source of the one load core.

When a server is configured (``FASTCKPT_SERVER``, ``Loader(server=...)``), every entry point
(``load``, ``open``, ``iter_tensors``, ``load_model``, the drop-in, the vLLM weight source) asks the
daemon for its copy of the checkpoint the load has already opened and validated: the request names
the generation by the identity of those very files, and the daemon answers with one sealed memfd
per partition (write, grow and shrink sealed: what the client checks is what it uses). The policy
then takes the bytes from there (``Source.DAEMON``): CPU buffers map the memfds copy-on-write,
device buffers read them through the pinned ring; ``verify=True`` checks every chunk of them.

Nothing here is required: no daemon, a refusal, a stall or nonsense all end in the files being
read directly (one warning per process for failures, silence for normal refusals). A socket served
by another user (not root, not ``FASTCKPT_SERVER_UID``) is never used, with a warning each time.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

from fastckpt.config import Config
from fastckpt.format.fsdir import OpenFile
from fastckpt.format.index import Index

_warned = False


def warn_once(reason: str) -> None:
    """One ``ServerUnavailableWarning`` per process: the daemon could not serve a load."""
    global _warned
    if _warned:
        return
    _warned = True
    from fastckpt.serve.client import ServerUnavailableWarning

    warnings.warn(
        f"fastckpt: the cache daemon could not serve a load ({reason}); loading from the files "
        "directly (warned once per process)",
        ServerUnavailableWarning,
        stacklevel=5,
    )


def identity_of(index: Index, files: Sequence[OpenFile]) -> str:
    """The daemon's identity of the generation the load opened: the checkpoint path and index
    file as they are now, the partitions as the open descriptors say (the daemon computes the
    same from the paths; a republish between the two gives different identities)."""
    from fastckpt.serve import names

    stamped: dict[str, names.FileStamp] = {}
    by_path = {p.path: files[i] for i, p in enumerate(index.partitions) if i < len(files)}
    for path in names.files_of(index):
        f = by_path.get(path)
        stamped[path] = names.stamp(os.fstat(f.fd) if f is not None else os.stat(path))
    return names.identity(index, stamped)


def fetch(
    index: Index,
    files: Sequence[OpenFile],
    cfg: Config,
    *,
    verify: bool = False,
    notes: list[str] | None = None,
) -> tuple[OpenFile, ...]:
    """The daemon's sealed copies of every partition (as ``OpenFile``s the caller closes), or
    ``()`` when it does not serve this checkpoint."""
    if not cfg.server or not index.partitions:
        return ()
    from fastckpt.rules import peers
    from fastckpt.serve import protocol
    from fastckpt.serve.client import Client, ServerRefused, ServerUnavailableWarning, check_memfd

    del verify  # the executor checks the bytes itself; the daemon's word is not needed
    from fastckpt.serve import names

    real = os.path.realpath(names.checkpoint_path(index))  # a single file names itself
    fds: list[int] = []
    try:
        ident = identity_of(index, files)
        with Client(
            cfg.server,
            cfg.server_timeout_s,
            fill_wait_s=cfg.server_fill_wait_s,
            trust_uid=cfg.server_uid,
        ) as client:
            try:
                reply, fds = client.get(real, ident, total=sum(p.nbytes for p in index.partitions))
            except ServerRefused as exc:
                if exc.code == "denied":
                    warn_once("the daemon refused this user")
                return ()
            sizes = reply.get("sizes")
            if (
                not isinstance(sizes, list)
                or sizes != [p.nbytes for p in index.partitions]
                or len(fds) != len(sizes)
                or reply.get("identity") != ident
            ):
                raise protocol.ProtocolError("the reply does not match the checkpoint")
            out: list[OpenFile] = []
            for i, (fd, size) in enumerate(zip(fds, sizes, strict=True)):
                check_memfd(fd, size)
                st = os.fstat(fd)
                path = f"{index.partitions[i].path} (cache daemon copy)"
                out.append(OpenFile(fd, path, size, st.st_dev, st.st_ino))
            fds = []
    except peers.UntrustedPeerError as exc:  # another user's daemon: said every time
        warnings.warn(
            f"fastckpt: the cache daemon was not used ({exc}); loading from the files directly",
            ServerUnavailableWarning,
            stacklevel=4,
        )
        return ()
    except (OSError, protocol.ProtocolError) as exc:  # TimeoutError is an OSError
        warn_once(f"{type(exc).__name__}: {exc}")
        return ()
    finally:
        protocol.close_fds(fds)
    if notes is not None:
        notes.append(f"served by the cache daemon at {cfg.server}")
    return tuple(out)
