"""Swarm membership on a hivemind DHT: signed, schema-checked, expiring peer records.

Every peer stores its PeerRecord under the DHT key `p2pcod/<swarm>/peers`, with its own RSA public key
as the subkey, signed (hivemind RSASignatureValidator): nobody else can write that subkey. The same RSA
key is the peer's libp2p identity, so a record's `peer_id` must be the peer id of the key that signed
it (checked by `PeerRecordValidator` on every node): nobody can announce someone else's peer id.
Records expire `ttl` seconds after the last announce (the heartbeat refreshes them).

The DHT runs in a forked hivemind process; this object's methods are synchronous and thread-safe.
Blob transfer (transfer.py) uses the same libp2p daemon through `p2p()`, on this object's event loop.

No orphans: the DHT process watches its parent and shuts down (p2pd with it) when the parent dies, however it
dies (kill -9 included), and p2pd gets SIGKILL from the kernel when the DHT process dies. An identity is held
by one peer at a time (a lock file in its directory, held by the peer and its DHT process), and a fixed listen
port still held by another process is refused: a restart never silently starts a second daemon beside a
previous one that is still running.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hivemind
import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from p2pcod.errors import ConfigError, RecordError, SwarmError
from p2pcod.swarm import lifetime
from p2pcod.swarm.aio import LoopThread
from p2pcod.swarm.lifetime import IdentityLock, TiedDHT, wait_ports_free
from p2pcod.swarm.records import MAX_RECORD_BYTES, PeerRecord, parse_wire, tombstone_wire, wire_peer_id

log = logging.getLogger(__name__)

IDENTITY_FILE = "p2p.key"  # libp2p identity (protobuf RSA private key), also the record-signing key
_SWARM_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_OWNER_RE = re.compile(re.escape(b"[owner:") + rb"(ssh-rsa [A-Za-z0-9+/=]{16,4096})" + re.escape(b"]"))
_HIVEMIND_SOCKETS = Path("/tmp/hivemind-p2pd-*.sock")  # where hivemind 1.1.x puts p2pd's control socket
_CALL_TIMEOUT = 30.0  # bound on one DHT get/store issued from here
_JOIN_ATTEMPTS = 4  # bootstrap tries before a joiner gives up (within start_timeout)
# hivemind's errors when no initial peer could be reached (p2pd) or none answered a ping (DHTNode)
_BOOTSTRAP_FAILED = ("failed to connect to bootstrap peers", "bootstrap failed")


def peers_key(swarm: str) -> str:
    return f"p2pcod/{swarm}/peers"


@functools.lru_cache(maxsize=1024)
def peer_id_of_owner(subkey: bytes) -> str:
    """The libp2p peer id (base58) of the RSA key in a `[owner:ssh-rsa ...]` subkey; RecordError if none."""
    m = _OWNER_RE.fullmatch(subkey)
    if not m:
        raise RecordError(f"subkey {subkey[:40]!r}... is not an owner key")
    try:
        public = RSAPublicKey.from_bytes(m.group(1))._public_key
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except Exception as err:  # noqa: BLE001 - anything unparsable is simply not a key
        raise RecordError(f"subkey holds no valid RSA public key: {err}") from None
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    mh = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(mh).to_base58()


def check_entry(subkey: Any, value: Any) -> PeerRecord | None:
    """Validate one (deserialized) entry of the peers dictionary: a PeerRecord, None for a tombstone."""
    if not isinstance(subkey, bytes):
        raise RecordError(f"subkey is a {type(subkey).__name__}, not an owner key")
    owner = peer_id_of_owner(subkey)
    claimed = wire_peer_id(value)
    if claimed != owner:
        raise RecordError(f"record claims peer_id {str(claimed)[:60]!r} but is signed by peer {owner}")
    return parse_wire(value)


class PeerRecordValidator(RecordValidatorBase):
    """Runs inside every DHT node: it refuses to store (or accept from others) malformed peer records."""

    def __init__(self, swarm: str) -> None:
        self.swarm = swarm
        self._key_id = DHTID.generate(source=peers_key(swarm)).to_bytes()
        self._warned: set[str] = set()  # offenders already logged (one line each, bounded)

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self._key_id:
            return True  # not ours to judge
        subkey: Any = record.subkey
        try:
            if len(record.value) > MAX_RECORD_BYTES or record.subkey in DHTProtocol.RESERVED_SUBKEYS:
                raise RecordError(f"record of {len(record.value)} bytes or reserved subkey")
            subkey = DHTProtocol.serializer.loads(record.subkey)
            check_entry(subkey, DHTProtocol.serializer.loads(record.value))
        except Exception as err:  # noqa: BLE001 - any failure to parse means invalid
            warn_offender(self._warned, "refusing a peer record", self.swarm, subkey, err)
            return False
        return True


def warn_offender(warned: set[str], what: str, swarm: str, subkey: Any, err: Exception) -> None:
    """Log a bad record once per offender: the peer id of its signing key, or a hash of an unsigned subkey."""
    try:
        offender = f"peer {peer_id_of_owner(subkey)}"
    except Exception:  # noqa: BLE001 - unsigned or unparsable subkey
        offender = f"subkey {hashlib.sha256(repr(subkey).encode()).hexdigest()[:16]}"
    if offender not in warned and len(warned) < 10_000:
        warned.add(offender)
        log.warning("%s of swarm %s from %s: %s", what, swarm, offender, err)


def load_identity(identity_dir: Path) -> tuple[Path, RSAPrivateKey]:
    """Create (first run) or load the peer's RSA identity; the file is reused across restarts."""
    identity_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = identity_dir / IDENTITY_FILE
    if not path.exists():
        P2P.generate_identity(str(path))
    try:
        der = crypto_pb2.PrivateKey.FromString(path.read_bytes()).data
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": der})
    except Exception as err:  # noqa: BLE001 - report which file is bad
        raise SwarmError(f"unreadable peer identity {path}: {err}") from err
    return path, key


class Membership:
    """This peer's node of the swarm DHT: announce my record, list everyone's."""

    def __init__(
        self,
        swarm: str,
        *,
        identity_dir: str | Path,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
        announce_maddrs: Sequence[str] = (),
        ttl: float = 30.0,
        start_timeout: float = 60.0,
    ) -> None:
        if not isinstance(swarm, str) or not _SWARM_RE.fullmatch(swarm):
            raise ConfigError(f"swarm name {swarm!r} must be 1..64 chars of [A-Za-z0-9._-]")
        if not ttl > 0:
            raise ConfigError(f"ttl must be > 0, got {ttl}")
        self.swarm = swarm
        self.key = peers_key(swarm)
        self.ttl = float(ttl)
        self.stats: dict[str, int] = {
            "announces": 0,
            "announce_failures": 0,
            "gets": 0,
            "invalid": 0,
            "tombstones": 0,
        }
        self._warned: set[str] = set()  # offenders already logged
        self._stats_lock = threading.Lock()
        self._lock = threading.Lock()  # hivemind's DHT pipe is not safe for concurrent senders
        self._p2p: P2P | None = None
        self._closed = False
        deadline = time.monotonic() + lifetime.HELD_GRACE
        self._identity_lock = IdentityLock(Path(identity_dir), deadline)
        try:
            identity_path, private_key = load_identity(Path(identity_dir))
            signer = RSASignatureValidator(private_key)
            self._subkey = signer.local_public_key
            self.peer_id = peer_id_of_owner(self._subkey)
            wait_ports_free(host_maddrs, deadline)
            self.dht = self._start_dht(
                initial_peers, host_maddrs, announce_maddrs, identity_path, signer, start_timeout
            )
        except BaseException:
            self._identity_lock.release()
            raise
        self.loop = LoopThread(f"p2pcod-swarm-{swarm}")
        self._finalizer = weakref.finalize(self, _shutdown, self.dht, self.loop, [None], self._identity_lock)
        actual = self.dht.peer_id.to_base58()
        if actual != self.peer_id:  # cannot happen unless hivemind changes how it derives peer ids
            self.shutdown()
            raise SwarmError(f"DHT peer id {actual} differs from the identity's {self.peer_id}")

    def _start_dht(self, initial_peers, host_maddrs, announce_maddrs, identity_path, signer, timeout):
        """Start the DHT process; while joining, retry a bootstrap that no initial peer answered in time.

        hivemind pings the initial peers once with a 3 s timeout: a busy bootstrap peer (a loaded machine, a
        slow link) misses that, so a joiner retries with backoff within `timeout` before giving up.
        """
        deadline = time.monotonic() + timeout
        backoff = 1.0
        for attempt in range(1, _JOIN_ATTEMPTS + 1):
            dht = TiedDHT(
                lock=self._identity_lock,
                initial_peers=list(initial_peers) or None,
                start=False,
                host_maddrs=list(host_maddrs),
                announce_maddrs=list(announce_maddrs) or None,
                identity_path=str(identity_path),
                record_validators=[signer, PeerRecordValidator(self.swarm)],
            )
            sockets_before = set(_HIVEMIND_SOCKETS.parent.glob(_HIVEMIND_SOCKETS.name))
            try:
                dht.run_in_background(await_ready=True, timeout=max(1.0, deadline - time.monotonic()))
                return dht
            except BaseException as err:
                _stop_dht(dht)
                _remove_dead_sockets(sockets_before)
                where = ", ".join(initial_peers) if initial_peers else "(no initial peers)"
                retry = (
                    isinstance(err, Exception)
                    and any(text in str(err) for text in _BOOTSTRAP_FAILED)
                    and attempt < _JOIN_ATTEMPTS
                    and time.monotonic() + backoff + 2.0 < deadline
                )
                if not retry:
                    raise SwarmError(
                        f"could not start the DHT node of swarm {self.swarm!r} joining through {where} "
                        f"(attempt {attempt}): {type(err).__name__}: {err}"
                    ) from err
                log.warning("no initial peer of %s answered (attempt %d of %d); retrying in %.0f s",
                            where, attempt, _JOIN_ATTEMPTS, backoff)
                time.sleep(backoff)
                backoff *= 2
        raise AssertionError("unreachable")

    # ---- records ----------------------------------------------------------------------------------
    def visible_maddrs(self) -> list[str]:
        """Multiaddrs (with /p2p/<peer id>) other peers can join through."""
        return [str(m) for m in self._call("run_coroutine", hivemind.DHT._get_visible_maddrs)]

    def announce(self, record: PeerRecord) -> bool:
        """Store (or refresh) my signed record, expiring `ttl` s from now.

        False if no DHT node took it; also when the DHT already holds one of my records expiring later
        (the DHT keeps the latest expiration, so shortening `ttl` needs the old record to run out first).
        """
        if record.peer_id != self.peer_id:
            raise RecordError(f"record peer_id {record.peer_id} is not this peer's id {self.peer_id}")
        return self._store(record.to_wire())

    def leave(self) -> None:
        """Best effort: replace my record by a tombstone (the DHT cannot delete), so others drop me now."""
        self._store(tombstone_wire(self.peer_id, get_dht_time()))

    def _store(self, wire: dict[str, Any]) -> bool:
        ok = bool(self._call("store", self.key, wire, get_dht_time() + self.ttl, subkey=self._subkey))
        self._count("announces" if ok else "announce_failures")
        return ok

    def members(self) -> list[PeerRecord]:
        """Every valid, unexpired peer record (mine included), sorted by name; invalid ones are dropped."""
        found = self._call("get", self.key, latest=True)
        self._count("gets")
        if found is None or not isinstance(found.value, dict):
            return []
        now = get_dht_time()
        out = []
        for subkey, item in found.value.items():
            if getattr(item, "expiration_time", 0) < now:
                continue
            try:
                record = check_entry(subkey, item.value)
            except RecordError as err:
                self._invalid(subkey, err)
                continue
            if record is None:
                self._count("tombstones")
            else:
                out.append(record)
        return sorted(out, key=lambda r: (r.name, r.peer_id))

    def _invalid(self, subkey: Any, err: RecordError) -> None:
        self._count("invalid")
        warn_offender(self._warned, "dropping an invalid peer record", self.swarm, subkey, err)

    # ---- plumbing ---------------------------------------------------------------------------------
    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise SwarmError(f"membership of swarm {self.swarm!r} is shut down")
        with self._lock:  # only the send needs the lock; the wait happens outside it
            try:
                future = getattr(self.dht, method)(*args, return_future=True, **kwargs)
            except Exception as err:
                raise SwarmError(f"DHT {method} failed: {type(err).__name__}: {err}") from err
        try:
            return future.result(_CALL_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise SwarmError(f"DHT {method} on {self.key} timed out after {_CALL_TIMEOUT:.0f} s") from None
        except Exception as err:
            raise SwarmError(f"DHT {method} failed: {type(err).__name__}: {err}") from err

    def p2p(self) -> P2P:
        """A P2P handle on this node's libp2p daemon, living on `self.loop` (for blob streams)."""
        with self._lock:
            if self._p2p is None:
                if self._closed:
                    raise SwarmError(f"membership of swarm {self.swarm!r} is shut down")
                maddr = self.dht.run_coroutine(hivemind.DHT._get_p2p_daemon_listen_maddr)
                self._p2p = self.loop.run(
                    P2P.replicate(maddr), timeout=_CALL_TIMEOUT, what="connecting to p2pd"
                )
                self._finalizer.detach()
                self._finalizer = weakref.finalize(
                    self, _shutdown, self.dht, self.loop, [self._p2p], self._identity_lock
                )
            return self._p2p

    def shutdown(self) -> None:
        """Stop the DHT process (and its libp2p daemon). Idempotent; also runs on GC and at exit."""
        with self._lock:
            self._closed = True
        self._finalizer()

    def __enter__(self) -> Membership:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _shutdown(dht: hivemind.DHT, loop: LoopThread, p2p_box: list, lock: IdentityLock) -> None:
    p2p = p2p_box[0]
    if p2p is not None:
        with contextlib.suppress(Exception):  # best effort at shutdown
            loop.run(p2p.shutdown(), timeout=5.0, what="closing the p2p handle")
    loop.stop()
    _stop_dht(dht)
    lock.release()  # after the DHT process is gone: the identity is free only once nothing uses it


def _remove_dead_sockets(before: set[Path]) -> None:
    """A p2pd that fails to start (e.g. no bootstrap peer answered) leaves its socket file behind: remove
    the ones that appeared since `before` and that nothing listens on (other processes' live ones stay)."""
    for path in set(_HIVEMIND_SOCKETS.parent.glob(_HIVEMIND_SOCKETS.name)) - before:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                continue  # alive: not ours to touch
            except OSError:
                pass
        with contextlib.suppress(OSError):
            path.unlink()


def _stop_dht(dht: hivemind.DHT) -> None:
    if dht.pid is None or dht._parent_pid != os.getpid():
        return
    with contextlib.suppress(Exception):  # falls back to killing the process below
        dht.shutdown()
    dht.join(5)
    if dht.is_alive():
        dht.kill()
        dht.join(5)
