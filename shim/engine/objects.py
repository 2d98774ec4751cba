"""Virtual object handles: the application sees one handle per object; each maps to
the handle of the same object on every member that holds it.

Objects are matched across members by identity (engine/identity.py). Several objects
may share one identity (two identical data objects): the fingerprint index keeps a
list, and a search hands each member's objects to distinct virtual handles. Member
handles are forgotten when they may have changed (a logout: SoftHSM2 renumbers private
objects; a member restart) and found again by identity when next needed."""
from __future__ import annotations

import itertools
import threading

from ..spec.constants import CK_INVALID_HANDLE


class HandleMap:
    def __init__(self):
        self._next = itertools.count(1)
        self._lock = threading.Lock()
        self.to_member: dict[int, dict[str, int]] = {}     # vh -> {member: mh}
        self.to_virtual: dict[str, dict[int, int]] = {}    # member -> {mh: vh}
        self.fingerprint: dict[int, str] = {}              # vh -> identity
        self.by_fingerprint: dict[str, list[int]] = {}     # identity -> vhs
        self.session_objects: dict[int, set[int]] = {}     # virtual session -> vhs

    def new(self, member: str, mh: int, fingerprint: str | None = None) -> int:
        """A new virtual handle for member object ``mh``."""
        with self._lock:
            vh = next(self._next)
            self.to_member[vh] = {}
        self.link(vh, member, mh)
        if fingerprint is not None:
            self.identify(vh, fingerprint)
        return vh

    def identify(self, vh: int, fingerprint: str):
        with self._lock:
            if self.fingerprint.get(vh) == fingerprint:
                return
            self.fingerprint[vh] = fingerprint
            self.by_fingerprint.setdefault(fingerprint, []).append(vh)

    def same_identity(self, fingerprint: str) -> list[int]:
        return self.by_fingerprint.get(fingerprint, [])

    def member(self, vh: int, member: str) -> int:
        """The member's handle for ``vh``; CK_INVALID_HANDLE when unknown, so that
        the member itself answers with its own *_HANDLE_INVALID code."""
        m = self.to_member.get(vh)
        if m is None:
            return CK_INVALID_HANDLE
        return m.get(member, CK_INVALID_HANDLE)

    def holders(self, vh: int):
        return self.to_member.get(vh, {})

    def link(self, vh: int, member: str, mh: int):
        """``mh`` is ``vh`` on ``member`` (replacing what either meant before)."""
        with self._lock:
            byv = self.to_virtual.setdefault(member, {})
            old_mh = self.to_member.setdefault(vh, {}).get(member)
            if old_mh is not None and byv.get(old_mh) == vh:
                del byv[old_mh]
            old_vh = byv.get(mh)
            if old_vh is not None and old_vh != vh:
                self.to_member.get(old_vh, {}).pop(member, None)
            byv[mh] = vh
            self.to_member[vh][member] = mh

    def forget(self, vh: int):
        with self._lock:
            for member, mh in self.to_member.pop(vh, {}).items():
                self.to_virtual.get(member, {}).pop(mh, None)
            fp = self.fingerprint.pop(vh, None)
            if fp is not None:
                same = self.by_fingerprint.get(fp, [])
                if vh in same:
                    same.remove(vh)
                if not same:
                    self.by_fingerprint.pop(fp, None)

    def mark_session_object(self, session: int, vh: int):
        self.session_objects.setdefault(session, set()).add(vh)

    def forget_session_objects(self, session: int):
        for vh in self.session_objects.pop(session, ()):
            self.forget(vh)

    def forget_member(self, member: str):
        with self._lock:
            for mh, vh in self.to_virtual.pop(member, {}).items():
                self.to_member.get(vh, {}).pop(member, None)

    def forget_member_handles(self):
        """Every member handle may have changed: keep the virtual handles and their
        identities, find the member objects again when next needed."""
        with self._lock:
            self.to_virtual.clear()
            for holders in self.to_member.values():
                holders.clear()
