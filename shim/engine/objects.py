"""Virtual object handles: the application sees one handle per object; each maps to
the handle of the same object on every member that holds it."""
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
        self.by_fingerprint: dict[str, int] = {}           # identity -> vh
        self.session_objects: dict[int, set[int]] = {}     # virtual session -> vhs

    def virtual(self, member: str, mh: int) -> int:
        """The virtual handle of member object ``mh`` (made on first sight)."""
        byv = self.to_virtual.setdefault(member, {})
        vh = byv.get(mh)
        if vh is None:
            with self._lock:
                vh = byv.get(mh)
                if vh is None:
                    vh = next(self._next)
                    byv[mh] = vh
                    self.to_member[vh] = {member: mh}
        return vh

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
        with self._lock:
            self.to_member.setdefault(vh, {})[member] = mh
            self.to_virtual.setdefault(member, {})[mh] = vh

    def forget(self, vh: int):
        with self._lock:
            for fp, v in list(self.by_fingerprint.items()):
                if v == vh:
                    del self.by_fingerprint[fp]
            for member, mh in self.to_member.pop(vh, {}).items():
                self.to_virtual.get(member, {}).pop(mh, None)

    def mark_session_object(self, session: int, vh: int):
        self.session_objects.setdefault(session, set()).add(vh)

    def forget_session_objects(self, session: int):
        for vh in self.session_objects.pop(session, ()):
            self.forget(vh)

    def forget_member(self, member: str):
        with self._lock:
            for mh, vh in self.to_virtual.pop(member, {}).items():
                self.to_member.get(vh, {}).pop(member, None)
