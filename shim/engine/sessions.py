"""Virtual sessions: what the application holds, and the real sessions behind them."""
from __future__ import annotations

import itertools
import threading

from .. import native
from ..spec.constants import CKF_RW_SESSION, CKS, CKU_SO, CKU_USER
from ..spec.fastpath import (ACTIVE, DROPPED, DROPPED_MULTIPART, ENDED, EXPIRED,
                             MULTIPART)

LIVE = (ACTIVE, MULTIPART, DROPPED, DROPPED_MULTIPART)     # the operation still runs


class VSession:
    __slots__ = ("handle", "flags", "members", "ops", "find", "lock", "direct", "fast")

    def __init__(self, handle: int, flags: int, direct=None):
        self.handle = handle
        self.flags = flags
        self.direct = direct                # a member's own slot (ha_only = false)
        self.fast = native.claim(handle)    # routes of the C fast path available
        self.members: dict[str, int] = {}   # member name -> member session handle
        self.ops: dict[str, Op] = {}        # active operation kind -> Op
        self.find = None                    # results of this session's search
        self.lock = threading.Lock()

    # ---- operations: the engine's record, mirrored to the C fast path -----------
    def begin(self, kind, op, member_key=0, alts=()):
        """``alts``: where the stub may start the same operation again (see
        native.alternatives); the operation's own member first."""
        self.ops[kind] = op
        if self.fast:
            native.route(self.handle, kind, op.member, self.members.get(op.member.name, 0))
            native.route_init(self.handle, kind, op.mech, op.key, member_key)
            native.alternatives(self.handle, kind, alts)

    def end(self, kind):
        if self.ops.pop(kind, None) is not None and self.fast:
            native.end(self.handle, kind)

    def sync(self):
        """Take in what the fast path did: operations it ended, started again (perhaps
        on another member) or made multi-part. The stub's record is the truth."""
        if self.fast and self.ops:
            for kind, op in list(self.ops.items()):
                st = native.state(self.handle, kind)
                if st == ENDED or st == EXPIRED:
                    self.end(kind)
                elif st in LIVE:
                    op.multipart = st in (MULTIPART, DROPPED_MULTIPART)
                    m = native.MEMBERS.get(native.route_member(self.handle, kind))
                    if m is not None:
                        op.member = m

    def multipart(self, kind):
        """The operation took a part: from now on it cannot be replayed elsewhere."""
        op = self.ops.get(kind)
        if op is not None:
            op.multipart = True
            if self.fast:
                native.multipart(self.handle, kind)

    def route_random(self, member, mh, alts=None):
        if self.fast:
            native.route(self.handle, "random", member, mh)
            native.alternatives(self.handle, "random", alts or [(member, mh, 0)])

    @property
    def rw(self) -> bool:
        return bool(self.flags & CKF_RW_SESSION)

    def state(self, login) -> int:
        if self.rw:
            return {None: CKS.RW_PUBLIC_SESSION, CKU_USER: CKS.RW_USER_FUNCTIONS,
                    CKU_SO: CKS.RW_SO_FUNCTIONS}[login]
        return {None: CKS.RO_PUBLIC_SESSION, CKU_USER: CKS.RO_USER_FUNCTIONS}.get(
            login, CKS.RO_PUBLIC_SESSION)


class Op:
    """An active cryptographic operation: where it runs, and how to start it again
    elsewhere (its *Init function, recorded mechanism and key)."""
    __slots__ = ("member", "init", "mech", "key", "multipart")

    def __init__(self, member, init, mech, key):
        self.member = member
        self.init = init
        self.mech = mech
        self.key = key
        self.multipart = False


class SessionTable:
    def __init__(self):
        self._next = itertools.count(1)
        self.by_handle: dict[int, VSession] = {}

    def new(self, flags: int, direct=None) -> VSession:
        vs = VSession(next(self._next), flags, direct)
        self.by_handle[vs.handle] = vs
        return vs

    def get(self, h: int):
        return self.by_handle.get(h)

    def remove(self, h: int):
        vs = self.by_handle.pop(h, None)
        if vs is not None and vs.fast:
            native.release(h)
        return vs

    def all(self):
        return list(self.by_handle.values())
