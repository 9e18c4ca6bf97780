"""What a peer holds for exactly as long as it lives: its DHT process, p2pd, its identity and its listen ports.

- `TiedDHT`: hivemind's DHT process (forked) watches its parent and shuts down, p2pd with it, when the parent
  dies however it dies (kill -9 included); p2pd gets SIGKILL from the kernel when the DHT process dies.
- `IdentityLock`: a flock on the identity directory's lock file, held by the peer and by its DHT process, so a
  second peer with the same identity stops with an error instead of starting a second swarm beside the first.
- `wait_ports_free`: a fixed listen port still held by another process is refused (p2pd binds with SO_REUSEPORT,
  so without this check a second daemon would share the port silently).
Each waits up to a grace period first: the processes of a peer killed a moment ago take a moment to go.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hivemind

from p2pcod.errors import SwarmError

log = logging.getLogger(__name__)

LOCK_FILE = "p2p.key.lock"  # in the identity directory; holds the pid of the peer that holds the identity
HELD_GRACE = 10.0  # s to wait for a previous run's processes to let go of the identity and ports
WATCH_EVERY = 0.5  # s between the DHT process's checks that its parent still lives
ORPHAN_EXIT = 5.0  # s an orphaned DHT process gives its graceful shutdown before it exits anyway
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_TCP_RE = re.compile(r"/(ip4|ip6)/([^/]+)/tcp/(\d+)(?:/.*)?")

_held_fds: set[int] = set()  # lock fds of this process; a forked DHT process closes all but its own


class IdentityLock:
    """An exclusive flock on `<identity_dir>/p2p.key.lock`; SwarmError naming the holder if it stays taken.

    The fd is shared with the DHT process forked while it is held, so the identity is free only once the peer
    and its DHT process have both exited (the kernel drops the lock of a process that dies, kill -9 included).
    """

    def __init__(self, identity_dir: Path, deadline: float) -> None:
        identity_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = identity_dir / LOCK_FILE
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._acquire(deadline)
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        _held_fds.add(self.fd)

    def _acquire(self, deadline: float) -> None:
        assert self.fd is not None
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise SwarmError(
                        f"peer identity {self.path.parent} is in use by process {holder} (a peer of this identity "
                        f"that is still running, or what is left of one): stop it, or give this peer another "
                        f"identity (another --run-dir)"
                    ) from None
                time.sleep(0.2)

    def release(self) -> None:
        """Drop this process's hold (the DHT process's copy goes when it exits). Idempotent."""
        if self.fd is not None:
            _held_fds.discard(self.fd)
            os.close(self.fd)
            self.fd = None


def wait_ports_free(host_maddrs: Sequence[str], deadline: float) -> None:
    """Return once every fixed TCP port of `host_maddrs` can be bound; SwarmError naming it if one stays held."""
    for maddr in host_maddrs:
        m = _TCP_RE.fullmatch(maddr)
        if not m or int(m.group(3)) == 0:
            continue  # port 0 (any free port) or not TCP: nothing to collide with
        family = socket.AF_INET if m.group(1) == "ip4" else socket.AF_INET6
        while not _bindable(family, m.group(2), int(m.group(3))):
            if time.monotonic() >= deadline:
                raise SwarmError(
                    f"cannot listen on {maddr}: port {m.group(3)} is held by another process (perhaps a peer of "
                    f"this identity that is still running): stop it, or listen on another port"
                )
            time.sleep(0.2)


def _bindable(family: socket.AddressFamily, host: str, port: int) -> bool:
    """Whether (host, port) can be bound without SO_REUSEPORT, i.e. nothing listens there now."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run's TIME_WAIT is no holder
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as p2pd binds: not the IPv4 port
        try:
            probe.bind((host, port))
        except OSError as err:
            return err.errno != errno.EADDRINUSE  # another error (no such address) is p2pd's to report
    return True


class TiedDHT(hivemind.DHT):
    """hivemind's DHT process, tied to the process that starts it and holding that process's identity lock."""

    def __init__(self, *args: Any, lock: IdentityLock | None = None, **kwargs: Any) -> None:
        self._tied_to = os.getpid()
        self._keep_fd = lock.fd if lock is not None else None
        super().__init__(*args, **kwargs)

    def run(self) -> None:  # in the forked DHT process, before hivemind's own run()
        for fd in _held_fds - {self._keep_fd}:  # other identities' locks are not this process's to hold
            with contextlib.suppress(OSError):
                os.close(fd)
        _tie_spawned_processes()
        threading.Thread(target=self._watch_parent, name="p2pcod-dht-watchdog", daemon=True).start()
        super().run()

    def _watch_parent(self) -> None:
        """Shut the DHT node (and p2pd) down once the parent is gone: reparented, getppid() changes."""
        while os.getppid() == self._tied_to:
            time.sleep(WATCH_EVERY)
        log.warning("peer process %d is gone: shutting its DHT node and p2p daemon down", self._tied_to)
        with contextlib.suppress(Exception):  # the parent's end of the command pipe, as DHT.shutdown() sends
            self._outer_pipe.send(("_shutdown", [], {}))
        time.sleep(ORPHAN_EXIT)
        os._exit(1)  # the graceful shutdown hung: p2pd still gets SIGKILL (its death signal)


def _prctl() -> Callable[..., int] | None:
    """libc's prctl on Linux, else None."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _tie_spawned_processes() -> None:
    """In the DHT process: every process it spawns (p2pd, through asyncio) is SIGKILLed when it dies.

    hivemind spawns p2pd with asyncio.subprocess.create_subprocess_exec from this process's main thread (its
    event loop), so a death signal set in the child before exec fires exactly when this process exits.
    """
    prctl = _prctl()
    if prctl is None:
        return
    spawn = asyncio.subprocess.create_subprocess_exec
    preexec = functools.partial(_die_with_parent, prctl, os.getpid())

    async def tied_spawn(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        kwargs.setdefault("preexec_fn", preexec)
        return await spawn(*args, **kwargs)

    asyncio.subprocess.create_subprocess_exec = tied_spawn  # this (forked) process only


def _die_with_parent(prctl: Callable[..., int], parent: int) -> None:
    """Between fork and exec: SIGKILL when the parent dies; exit now if it died already."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
