"""Listening Unix sockets, created the way every socket of this program is.

Shared by the vhost-user server and the control socket: a path that is not a
socket is never replaced, a live socket is never stolen, a stale one (left by
a dead process) is removed; the socket is bound under a temporary name with a
0600 umask and renamed into place once listening, so the path appears only
when a connect() to it can succeed, and never with wider permissions.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
import threading

log = logging.getLogger(__name__)

SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, without the final NUL


def listen_unix(
    path: str, *, mode: int = 0o600, backlog: int = 4, group: str | None = None,
    kind: int = socket.SOCK_STREAM,
) -> socket.socket:
    """A listening socket at ``path``; raises ``ValueError`` or ``OSError``.

    ``group``: give the socket to this group (then ``mode`` 0660 lets its members
    connect, e.g. a QEMU that runs as another user). ``kind``: SOCK_STREAM, or
    SOCK_SEQPACKET (the net switch).
    """
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"group {group!r} does not exist") from None
    if not path:
        raise ValueError("empty socket path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ValueError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, kind)
        try:
            probe.connect(path)
        except OSError:
            log.info("removing stale socket %s", path)
            os.unlink(path)
        else:
            raise ValueError(f"{path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    staging = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    if len(os.fsencode(staging)) > SUN_PATH_MAX:
        staging = path  # bind in place when the temporary name would not fit
    old_umask = os.umask(0o177)
    try:
        sock.bind(staging)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    try:
        if gid != -1:
            os.chown(staging, -1, gid)
        os.chmod(staging, mode)
        sock.listen(backlog)
        if staging != path:
            os.rename(staging, path)
    except OSError:
        sock.close()
        try:
            os.unlink(staging)
        except OSError:
            pass
        raise
    return sock
