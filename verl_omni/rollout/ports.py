"""Reserve a listening port by binding it, and keep the socket: a reserved port cannot be taken later.

vllm-omni's own multi-replica launcher picked ports by probing then binding later, so two replicas on
one host could pick the same one. Here the server binds first and hands the bound socket to uvicorn.
"""

from __future__ import annotations

import logging
import socket
from typing import Optional

logger = logging.getLogger(__name__)


def reserve_socket(host: str = "127.0.0.1", preferred_port: Optional[int] = None, search: int = 64) -> socket.socket:
    """Bind and return a socket. ``preferred_port`` None lets the OS pick a free port; otherwise the
    first free port in ``[preferred_port, preferred_port + search)`` is taken (a busy one is logged)."""
    candidates = [0] if preferred_port is None else range(preferred_port, preferred_port + search)
    last_error: Optional[OSError] = None
    for port in candidates:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            last_error = exc
            if preferred_port is not None:
                logger.warning("port %s on %s is taken (%s); trying the next one", port, host, exc)
            continue
        sock.listen(128)
        sock.set_inheritable(True)
        return sock
    if preferred_port is None:
        raise OSError(f"could not bind an OS-assigned port on {host}: {last_error}")
    raise OSError(f"no free port in [{preferred_port}, {preferred_port + search}) on {host}: {last_error}")
