"""The table lock: a lease on one brand/table that at most one run holds, using only the storage backend.

The lease is one small file, ``LOCK``, holding JSON: the holder (a readable run name), a token unique to each
:class:`TableLock`, host, pid (and its PID namespace, ``pid_ns``, on Linux), ``acquired_at``, ``refreshed_at`` and
``expires_at`` (epoch seconds). A pid is judged only where it means something: the same host name and PID namespace
(containers sharing the host's network share its name, not its processes): :mod:`.lock_records` reads a record.

**Acquire.** An absent ``LOCK`` is taken with the backend's exclusive create: of several runs, exactly one
creates it. A present ``LOCK`` is respected (the run fails fast, naming the holder) unless it is stale: expired
(not refreshed for ``ttl_s``), left by a process of this host that is gone, or unreadable.

**Changing an existing LOCK** (breaking a stale one, refreshing, releasing) is guarded by a *claim*: a file
``LOCK.<digest>.claim`` named after the exact bytes of the ``LOCK`` being changed, created exclusively. Only
the run that created the claim changes the ``LOCK``, and only after reading it again and finding the same
bytes; then it deletes the claim. So two runs that see the same stale lock cannot both break it: the second
cannot create the claim while the first holds it, and once the first is done the ``LOCK`` has other bytes (its
own token). A refresh and a break of the same ``LOCK`` are serialised the same way, so a breaker never deletes
a lease its owner renewed a moment before. A claim left by a crash is removed once its process on this host is
gone or it is older than ``CLAIM_STALE_S`` (through a claim on the claim, so two runs cannot both remove it).

How strict this is depends on the backend's exclusive create: locally it is atomic (a hard link or ``O_EXCL``);
on an object store it is as strong as ``open(mode="xb")`` (a conditional PUT on S3); where a file system has no
such mode, two runs starting in the same instant can both get in. The commit's base check (CURRENT must still
be the snapshot the run started from) keeps the snapshot consistent even then.

**Owner-checked refresh.** Only the owner extends its lease: :meth:`TableLock.refresh` reads the ``LOCK`` first,
and if the token is not its own (another run broke the lease after it expired and took it), it raises
:class:`SnapshotLockedError` and writes nothing. :meth:`TableLock.heartbeat` refreshes from a daemon thread every
``min(30 s, ttl_s / 3)`` while a block runs; a lost lease is recorded, and :meth:`TableLock.check`, called before
writing a commit, raises.

**Fencing every request.** A request must have landed before another run could take the table, else an older
value could arrive after the new owner's newer one and stay. :meth:`TableLock.fence` is called before every HTTP
attempt (the client calls it before each try, retries after a 429 or a 5xx included) with the longest time that
attempt can take, ``request_s`` (the client's connect timeout plus its read timeout). The rule:

* a *confirmation* is a moment this run saw the ``LOCK`` as its own (it acquired, refreshed or read it); it
  tells until when the lease holds: the ``expires_at`` it saw, at most ``ttl_s`` after the confirmation;
* no other run may break the lease before ``expires_at`` (only a person's ``stopchurn unlock --force`` can), but
  another host judges ``expires_at`` by its own clock, so ``margin_s = ttl_s / 10`` is kept for clock skew and
  storage latency;
* an attempt may start at ``now`` only while ``now + request_s + margin_s <= expires_at`` (judged on both the
  monotonic and the wall clock, so that neither a clock step nor a suspended machine stretches it): the
  confirmation's age plus the request's duration stays below the time before another run could break the lease;
* otherwise the ``LOCK`` is read again (and refreshed when its remaining lease is too short); a ``LOCK`` that is no
  longer this run's raises :class:`SnapshotLockedError` and nothing is sent. So ``lock_ttl_s`` must exceed
  ``request_s + margin_s``; a shorter lease cannot fence a request and is refused before anything is sent.

A lease broken by hand (``stopchurn unlock --force``) while its run lives is found by that run's next heartbeat
(within ``heartbeat_s``); until then, and while requests already sent are in flight, both runs may send. A pause
between the fence and the socket write longer than ``margin_s`` is not covered either: StopChurn's API has no
fencing token that would let the server refuse a stale writer.

This module imports no Airflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any

from airflow_provider_stopchurn.exceptions import SnapshotError, SnapshotLockedError, StopChurnConfigError
from airflow_provider_stopchurn.store.backend import Backend
from airflow_provider_stopchurn.store.constants import FORMAT_VERSION
from airflow_provider_stopchurn.store.lock_records import gone_pid, iso, loose_json, pid_namespace

log = logging.getLogger(__name__)

#: A claim older than this is left by a crashed run (a live one holds its claim for a few storage calls).
CLAIM_STALE_S = 30.0
_ATTEMPTS = 100  # bounds every loop that waits for another run's claim (~2 s of waiting in all)
_PAUSE_S = 0.02
_TORN_GRACE_S = 0.5  # an unreadable LOCK is broken only if it is still the same after this pause


class _Outcome(Enum):
    DONE = "done"  # the LOCK had the expected bytes and was changed
    CHANGED = "changed"  # the LOCK no longer has the expected bytes: nothing was changed
    BUSY = "busy"  # another run holds the claim on these bytes: nothing was changed, try again shortly


class TableLock:
    """A lease on one brand/table, held by at most one run.

    :param backend: the table's storage (the ``LOCK`` file lives at its top).
    :param holder: a readable name of the run, shown to a run that finds the table locked.
    :param ttl_s: the lease lasts this long after each refresh.
    :param label: how messages name the table (``"<brand>/<table>"``).
    :param heartbeat_s: the heartbeat's interval and the refresh rate limit; default ``min(30 s, ttl_s / 3)``.
    :param name: the lock file's name.
    """

    def __init__(
        self,
        backend: Backend,
        holder: str,
        *,
        ttl_s: float = 3600.0,
        label: str = "",
        heartbeat_s: float | None = None,
        name: str = "LOCK",
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s!r}")
        self.backend = backend
        self.holder = holder
        self.ttl_s = float(ttl_s)
        self.label = label or backend.location()
        self.interval_s = float(heartbeat_s) if heartbeat_s is not None else min(30.0, self.ttl_s / 3)
        self.name = name
        self.token = uuid.uuid4().hex
        self._mutex = threading.RLock()  # one refresh / check / release at a time (heartbeat vs engine thread)
        self._acquired_at: float | None = None
        self._last_refresh = 0.0
        self._confirmed = float("-inf")  # when this run last saw the LOCK as its own (monotonic)
        # until when that confirmation says the lease holds, on the monotonic and on the wall clock (see fence())
        self._held_mono = float("-inf")
        self._held_wall = float("-inf")
        self._lost: SnapshotLockedError | None = None
        self._beat: tuple[threading.Thread, threading.Event] | None = None

    def __repr__(self) -> str:
        return f"TableLock({self.label!r}, holder={self.holder!r})"

    # --- state -----------------------------------------------------------------------------------------------
    @property
    def lost(self) -> SnapshotLockedError | None:
        """Why this run no longer holds its lock (found by a refresh or the heartbeat), or None."""
        return self._lost

    @property
    def acquired_at(self) -> float | None:
        """When this run took the lock (epoch seconds by its own clock, read before the LOCK was written), or None
        before it did."""
        return self._acquired_at

    @property
    def heartbeat_running(self) -> bool:
        return self._beat is not None and self._beat[0].is_alive()

    def _record(self) -> bytes:
        now = time.time()
        acquired = self._acquired_at if self._acquired_at is not None else now
        record = {
            "format_version": FORMAT_VERSION,
            "holder": self.holder,
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_ns": pid_namespace(),  # a pid means something only in its own namespace
            "acquired_at": iso(acquired),
            "refreshed_at": iso(now),
            "expires_at": now + self.ttl_s,
            # how often the holder refreshes: `stopchurn unlock` tells a live holder from a dead one by it
            "heartbeat_s": self.interval_s,
        }
        return json.dumps(record, sort_keys=True).encode()

    @property
    def margin_s(self) -> float:
        """What :meth:`fence` keeps in hand for clock skew between hosts and storage latency: ``ttl_s / 10``."""
        return self.ttl_s / 10

    def _confirm(self, expires_at: Any, mono: float, wall: float) -> None:
        """Note a confirmation: the LOCK, seen as this run's at ``mono``/``wall``, holds until ``expires_at``."""
        try:
            remaining = float(expires_at) - wall
        except (TypeError, ValueError):
            remaining = 0.0
        self._confirmed = mono
        self._held_mono = mono + remaining
        self._held_wall = wall + remaining

    def _covers(self, seconds: float) -> bool:
        """Whether the last confirmation says the lease holds for ``seconds`` more, on both clocks."""
        return time.monotonic() + seconds <= self._held_mono and time.time() + seconds <= self._held_wall

    def _stale(self, current: dict[str, Any] | None) -> str | None:
        """Why a lock found in place may be broken, or None while it is live."""
        if current is None:
            return "its file is unreadable (its writer died mid-write)"
        try:
            expires = float(current.get("expires_at", 0))
        except (TypeError, ValueError):
            return "it has no valid expiry"
        if expires < time.time():
            return f"it expired at {iso(expires)}"
        pid = gone_pid(current)
        if pid is not None:
            return f"its process {pid} on this host is gone"
        return None

    def _describe(self, current: dict[str, Any] | None) -> str:
        if current is None:
            return "an unknown run (the lock file is missing or unreadable)"
        return (
            f"{current.get('holder')!r} (host {current.get('host')}, pid {current.get('pid')}, "
            f"since {current.get('acquired_at')})"
        )

    def _lose(self, current: dict[str, Any] | None) -> SnapshotLockedError:
        now = "The lock is free now" if current is None else f"The lock is now held by {self._describe(current)}"
        err = SnapshotLockedError(
            f"{self.label}: this run lost its lock to {(current or {}).get('holder', 'another run')!r}; it sends "
            "nothing more and stops without committing.\n"
            f"This run: {self.holder!r}. {now}.\n"
            "Its lease was not refreshed in time (a pause longer than lock_ttl_s?), or it was broken by hand. The "
            "next run settles what StopChurn acknowledged of this run's plan and syncs the rest."
        )
        self._lost = err
        return err

    # --- claims ----------------------------------------------------------------------------------------------
    def _claim_record(self) -> bytes:
        record = {
            "holder": self.holder,
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_ns": pid_namespace(),
            "created": time.time(),
        }
        return json.dumps(record, sort_keys=True).encode()

    def _with_claim(self, name: str, expected: bytes, action: Callable[[], None], *, depth: int = 0) -> _Outcome:
        """Run ``action`` if the file ``name`` still holds ``expected``, excluding every other run doing the same."""
        claim = f"{name}.{hashlib.sha256(expected).hexdigest()[:24]}.claim"
        if not self.backend.create_exclusive(claim, self._claim_record()):
            self._remove_if_abandoned(claim, depth)
            return _Outcome.BUSY
        try:
            if self.backend.read_bytes(name) != expected:
                return _Outcome.CHANGED
            action()
            return _Outcome.DONE
        finally:
            self.backend.delete(claim)

    def _remove_if_abandoned(self, claim: str, depth: int) -> None:
        """Remove a claim whose run crashed while holding it; a claim on the claim keeps this to one run."""
        raw = self.backend.read_bytes(claim)
        record = loose_json(raw)
        if raw is None or record is None or depth >= 1:
            return  # gone already, being written, or a claim on a claim: leave it to its age
        pid = gone_pid(record)
        try:
            age = time.time() - float(record.get("created", 0))
        except (TypeError, ValueError):
            age = CLAIM_STALE_S + 1
        if pid is None and age <= CLAIM_STALE_S:
            return
        log.warning("Removing %s, left by a run that crashed while changing the lock.", self.backend.location(claim))
        self._with_claim(claim, raw, lambda: self.backend.delete(claim), depth=depth + 1)

    # --- acquire / refresh / check / release ------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock, or raise :class:`SnapshotLockedError` naming the run that holds it."""
        with self._mutex:
            torn: bytes | None = None
            for _ in range(_ATTEMPTS):
                raw = self.backend.read_bytes(self.name)
                if raw is None:
                    mono, self._acquired_at = time.monotonic(), time.time()  # taken before the record: cautious
                    record = self._record()
                    if self.backend.create_exclusive(self.name, record):
                        self._last_refresh = time.monotonic()
                        self._confirm(json.loads(record)["expires_at"], mono, self._acquired_at)
                        self._lost = None
                        return
                    continue  # another run created it a moment ago: look at it
                current = loose_json(raw)
                if current is None and raw != torn:
                    # unreadable: maybe a writer without atomic create is mid-write; broken only if it stays so
                    torn = raw
                    time.sleep(_TORN_GRACE_S)
                    continue
                reason = self._stale(current)
                if reason is None:
                    raise self._busy(current)
                holder = (current or {}).get("holder")

                def brk(holder: Any = holder, reason: str = reason) -> None:
                    log.warning("Breaking the lock of %r on %s: %s.", holder, self.label, reason)
                    self.backend.delete(self.name)

                if self._with_claim(self.name, raw, brk) is _Outcome.BUSY:
                    time.sleep(_PAUSE_S)  # another run is changing this same lock: see what it did
            raise SnapshotLockedError(
                f"{self.label}: could not take the lock, other runs keep changing it.\n"
                f"Tried {_ATTEMPTS} times: {self.backend.location(self.name)}. Try again in a minute (a claim left "
                f"by a crashed run is removed after {CLAIM_STALE_S:.0f} s); `stopchurn status` shows who holds it."
            )

    def _busy(self, current: dict[str, Any] | None) -> SnapshotLockedError:
        expires = float((current or {}).get("expires_at", 0))
        return SnapshotLockedError(
            f"{self.label} is being synced by another run.\n"
            f"Holder: {self._describe(current)}.\n"
            f"Wait for it to finish. A lock left by a killed run expires at {iso(expires)} (at once when its "
            "process is gone from this host); or break it with `stopchurn unlock` once that run is known to be dead."
        )

    def refresh(self, *, force: bool = False) -> None:
        """Extend the lease, after checking that this run still owns it.

        Rate-limited to one write per heartbeat interval unless ``force``. Raises :class:`SnapshotLockedError`, and
        writes nothing, when another run took the lock over.
        """
        with self._mutex:
            if self._lost is not None:
                raise self._lost
            if not force and time.monotonic() - self._last_refresh < self.interval_s:
                return
            for _ in range(_ATTEMPTS):
                raw = self.backend.read_bytes(self.name)
                current = loose_json(raw)
                if raw is None or current is None or current.get("token") != self.token:
                    raise self._lose(current)
                mono, wall = time.monotonic(), time.time()  # taken before the record's expiry: cautious
                record = self._record()

                def renew(record: bytes = record) -> None:
                    self.backend.write_bytes(self.name, record, durable=True)

                outcome = self._with_claim(self.name, raw, renew)
                if outcome is _Outcome.DONE:
                    self._last_refresh = time.monotonic()
                    self._confirm(json.loads(record)["expires_at"], mono, wall)
                    return
                if outcome is _Outcome.BUSY:
                    time.sleep(_PAUSE_S)  # a run that took the lease for stale is breaking it, or gives up
            raise self._lose(loose_json(self.backend.read_bytes(self.name)))

    def check(self, *, max_age_s: float = 0.0, min_remaining_s: float = 0.0) -> None:
        """Raise :class:`SnapshotLockedError` unless this run still holds the lock; call it before a commit.

        A lease that expired (or is about to) but is still this run's is refreshed first, so the commit that
        follows runs under a whole lease.

        :param max_age_s: trust a confirmation (acquire, refresh or check) younger than this instead of reading
            the LOCK again; capped at the heartbeat interval, within which the lease cannot have expired. The check
            before a commit keeps the default, 0; a check before a request is :meth:`fence`.
        :param min_remaining_s: refresh the lease when less than this (or than the heartbeat interval) is left.
        """
        with self._mutex:
            if self._lost is not None:
                raise self._lost
            if time.monotonic() - self._confirmed < min(max_age_s, self.interval_s):
                return
            current = loose_json(self.backend.read_bytes(self.name))
            mono, wall = time.monotonic(), time.time()  # taken after the read: cautious
            if current is None or current.get("token") != self.token:
                raise self._lose(current)
            try:
                remaining = float(current.get("expires_at", 0)) - wall
            except (TypeError, ValueError):
                remaining = 0.0
            if remaining < max(self.interval_s, min_remaining_s):
                self.refresh(force=True)
            else:
                self._confirm(current.get("expires_at"), mono, wall)

    def fence(self, request_s: float = 0.0) -> None:
        """Raise unless this run holds the lease for the next ``request_s`` seconds; call it before every request.

        Trusts the last confirmation while ``now + request_s + margin_s`` stays within the lease it saw (the rule is
        in the module docstring); otherwise reads the ``LOCK`` again, refreshing it when too little is left. Raises
        :class:`SnapshotLockedError` (nothing may be sent) when the lease is no longer this run's, and
        :class:`~airflow_provider_stopchurn.exceptions.StopChurnConfigError` when even a whole lease (``ttl_s``)
        is too short to cover one request.

        :param request_s: the longest time the request about to start can take.
        """
        need = max(0.0, float(request_s)) + self.margin_s
        if need >= self.ttl_s:
            raise StopChurnConfigError(
                f"{self.label}: lock_ttl_s={self.ttl_s:g} is too short to fence a request that may take "
                f"{request_s:g} s (the client's connect timeout plus its read timeout).\n"
                f"Nothing was sent. Raise lock_ttl_s above {request_s / 0.9:.0f} s (a tenth of the lease is kept "
                "for clock skew), or lower the connection's timeouts (its extra `timeout`)."
            )
        with self._mutex:
            if self._lost is not None:
                raise self._lost
            if self._covers(need):
                return
            self.check(min_remaining_s=need)
            if not self._covers(need):
                raise SnapshotLockedError(
                    f"{self.label}: could not confirm this run's lock for the next request in time (the lock's "
                    f"storage answered too slowly for lock_ttl_s={self.ttl_s:g}); nothing more was sent.\n"
                    "The next run settles what was acknowledged and goes on."
                )

    def release(self) -> None:
        """Delete the lock if it is still this run's; never someone else's. Failures are logged, not raised."""
        self.stop_heartbeat()
        with self._mutex:
            self._confirmed = self._held_mono = self._held_wall = float("-inf")
            try:
                for _ in range(_ATTEMPTS):
                    raw = self.backend.read_bytes(self.name)
                    current = loose_json(raw)
                    if raw is None or current is None or current.get("token") != self.token:
                        return
                    outcome = self._with_claim(self.name, raw, lambda: self.backend.delete(self.name))
                    if outcome is _Outcome.DONE:
                        return
                    if outcome is _Outcome.BUSY:
                        time.sleep(_PAUSE_S)
                log.warning("Could not release the lock of %s; it expires by itself.", self.label)
            except SnapshotError as err:
                log.warning("Could not release the lock of %s (%s); it expires by itself.", self.label, err)

    def break_lease(self, token: str) -> bool:
        """Delete the LOCK while it holds the lease ``token`` (another run's), through a claim like any change.

        For a person breaking a dead run's lock: its owner may refresh it meanwhile (same token, new bytes: it is
        read again), but a run that took the table since (another token) keeps it. Returns whether it was deleted.
        """
        with self._mutex:
            for _ in range(_ATTEMPTS):
                raw = self.backend.read_bytes(self.name)
                current = loose_json(raw)
                if raw is None or current is None or current.get("token") != token:
                    return False
                holder = current.get("holder")

                def brk(holder: Any = holder) -> None:
                    log.warning("Breaking the lock of %r on %s by hand.", holder, self.label)
                    self.backend.delete(self.name)

                outcome = self._with_claim(self.name, raw, brk)
                if outcome is _Outcome.DONE:
                    return True
                if outcome is _Outcome.BUSY:
                    time.sleep(_PAUSE_S)
            raise SnapshotLockedError(
                f"{self.label}: could not break the lock after {_ATTEMPTS} attempts, other runs keep changing "
                f"{self.backend.location(self.name)}. Try again."
            )

    # --- heartbeat -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def heartbeat(self, interval_s: float | None = None) -> Iterator[TableLock]:
        """Refresh the lease from a daemon thread while the block runs (every ``interval_s``)."""
        self.start_heartbeat(interval_s)
        try:
            yield self
        finally:
            self.stop_heartbeat()

    def start_heartbeat(self, interval_s: float | None = None) -> None:
        if self._beat is not None:
            raise RuntimeError(f"The heartbeat of {self!r} is already running.")
        interval = float(interval_s) if interval_s is not None else self.interval_s
        if interval <= 0:
            raise ValueError(f"interval_s must be positive, got {interval!r}")
        stop = threading.Event()
        thread = threading.Thread(
            target=self._beat_loop, args=(stop, interval), name=f"stopchurn-lock-heartbeat {self.label}", daemon=True
        )
        self._beat = (thread, stop)
        thread.start()

    def stop_heartbeat(self, timeout_s: float = 10.0) -> None:
        beat, self._beat = self._beat, None
        if beat is None:
            return
        thread, stop = beat
        stop.set()
        if thread is not threading.current_thread():
            thread.join(timeout_s)
        if thread.is_alive():
            log.warning("The lock heartbeat of %s did not stop within %.0f s (slow storage?).", self.label, timeout_s)

    def _beat_loop(self, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            try:
                self.refresh(force=True)
            except SnapshotLockedError as err:
                log.error("%s", err)
                return  # recorded in self.lost; check() raises it before the commit
            except Exception as err:  # storage hiccup: the lease has ttl_s to spare, try again next beat
                log.warning("Could not refresh the lock of %s (%s); trying again in %.1f s.", self.label, err, interval)
