"""The control side of a KV pair (kvtransfer/nccl_pairs.py): who a holder is
(host id, backend) and the length-prefixed pickle messages on the control socket
(``hello``/``pair``, ``pull``/``done``, ``bye``) and where a batch's pulls sit
in its one buffer."""

from __future__ import annotations

import pickle
import select
import socket
import struct

import torch

_HEADER = struct.Struct("!I")


def host_id() -> str:
    """Identifies this machine (two workers share GPUs' NVLink only on one host)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def backend_name(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def send_msg(sock: socket.socket, obj) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def recv_msg(sock: socket.socket):
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return pickle.loads(_recv_exact(sock, n))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the control connection")
        buf += chunk
    return bytes(buf)


def peer_closed(sock: socket.socket) -> bool:
    """True once the peer closed the connection (and no message is left unread)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock



_SLOT_ALIGN = 256      # each pull's bytes start on this boundary in a batch buffer (any dtype views)


def batch_layout(sizes: list[int]) -> tuple[list[int], int]:
    """Where each pull's bytes sit in one batch's buffer (both ends compute the
    same): ``(offsets, total)``."""
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end += -(-n // _SLOT_ALIGN) * _SLOT_ALIGN
    return offsets, (offsets[-1] + sizes[-1]) if sizes else 0
