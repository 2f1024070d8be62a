"""Rank heartbeats through the rendezvous store: who is gone, why, and an end to hangs.

Each rank's watchdog thread writes `fastdash/alive/<rank>` every HEARTBEAT_S through its own store
client (the trainer's thread may sit in a collective); a rank that fails records its cause under
`fastdash/failed/<rank>`. `diagnose` names the silent ranks and their causes; the thread ends the
process when a peer has been silent longer than `dist_timeout_s` (a collective that never errors).
"""
from __future__ import annotations

import faulthandler
import logging
import os
import threading
import time

import torch.distributed as dist

log = logging.getLogger("fastdash")
HEARTBEAT_S = 1.0
STALE_S = 6.0  # a heartbeat older than this means the rank is gone (loaded machines skip beats)


class Watchdog:
    """Heartbeats through its own store client (a thread of its own; the trainer's may be blocked)."""

    def __init__(self, addr, port, r, world, limit_s, timeout):
        try:  # a rank that aborts (SIGABRT, SIGSEGV) prints every thread's Python stack
            faulthandler.is_enabled() or faulthandler.enable()
        except (RuntimeError, ValueError, OSError):  # stderr without a file descriptor: no stacks, no failure
            pass
        self.r, self.world, self.limit_s = r, world, limit_s
        self.store = dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
        self.unreachable_since: float | None = None
        self._stop = threading.Event()
        self._beat()
        self.thread = threading.Thread(target=self._run, name="fastdash-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        self.store.set(f"fastdash/alive/{self.r}", repr(time.time()))

    def record(self, cause: str) -> None:
        try:
            self.store.set(f"fastdash/failed/{self.r}", cause)
        except Exception:  # noqa: BLE001 - the store's host may be the rank that died
            pass

    def silent(self) -> dict[int, float] | None:
        """Peers whose last heartbeat is older than STALE_S: {rank: seconds}; None when the store is gone."""
        now, out = time.time(), {}
        try:
            for p in range(self.world):
                if p != self.r:
                    age = now - float(self.store.get(f"fastdash/alive/{p}").decode())
                    if age > STALE_S:
                        out[p] = age
        except Exception:  # noqa: BLE001 - connection refused / reset: the store's host is gone
            return None
        return out

    def diagnose(self, wait: float) -> str:
        deadline = time.time() + wait
        while True:
            silent = self.silent()
            if silent is None:
                return "rank 0 is gone (the rendezvous store it hosts is unreachable)"
            if silent or time.time() > deadline:
                break
            time.sleep(HEARTBEAT_S / 2)
        if not silent:
            return "every peer still sends heartbeats (a collective timed out or a peer raised)" + self._causes()
        return ", ".join(f"rank {p} is gone (no heartbeat for {age:.0f} s)" for p, age in silent.items()) + self._causes()

    def _causes(self) -> str:
        found = []
        for p in range(self.world):
            try:
                if p != self.r and self.store.check([f"fastdash/failed/{p}"]):
                    found.append(f"rank {p} failed with {self.store.get(f'fastdash/failed/{p}').decode()}")
            except Exception:  # noqa: BLE001
                pass
        return ("; " + "; ".join(found)) if found else ""

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # noqa: BLE001
                pass
            silent = self.silent()
            if silent is None:  # the store's host (rank 0) is gone, or only briefly unreachable
                self.unreachable_since = self.unreachable_since or time.time()
                silent = {0: time.time() - self.unreachable_since}
            else:
                self.unreachable_since = None
            gone = silent
            if any(age > self.limit_s for age in gone.values()):
                # the main thread may sit in a collective that never errors (NCCL without async error
                # handling): end the process rather than hang
                log.error("rank %d: %s for longer than dist_timeout_s=%ds; exiting", self.r,
                          ", ".join(f"rank {p} silent" for p in gone), self.limit_s)
                logging.shutdown()
                os._exit(1)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2 * HEARTBEAT_S)
