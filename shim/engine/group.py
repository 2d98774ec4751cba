"""The HA group: one virtual slot over the configured members.

Sessions, object handles and logins are virtual (shim/engine/sessions.py,
objects.py); every call is routed to a member and its handles translated:
  * key management and object administration go to the primary (first online member);
  * cryptographic operations go to the least busy online member holding their key,
    and stay there from *Init to completion (a length query keeps the binding);
  * logins are fanned out to every member.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading

from ..errors import P11Error
from ..members.member import Member
from ..members.module import ffi
from ..spec.constants import (CKF_RW_SESSION, CKF_SERIAL_SESSION, CKF_TOKEN_PRESENT,
                              CKF_REMOVABLE_DEVICE, CKR, CKR_OK, CKU_SO, CKU_USER,
                              CKU_CONTEXT_SPECIFIC, CK_INVALID_HANDLE)
from .objects import HandleMap
from .sessions import SessionTable

log = logging.getLogger("hashim")

OK = CKR_OK
BUFFER_TOO_SMALL = CKR.BUFFER_TOO_SMALL
VERSION = (0, 1)


def pad(text: str, n: int) -> bytes:
    b = text.encode()[:n]
    return b + b" " * (n - len(b))


def cache_dir_for(config) -> str:
    base = config.group.state_dir or os.path.join(
        os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/hashim-{os.getuid()}",
        hashlib.sha256(os.path.abspath(config.path).encode()).hexdigest()[:12])
    return os.path.join(base, "lib")


class Group:
    def __init__(self, config):
        self.config = config
        self.label = config.group.label
        self.slot_id = config.group.slot_id
        self.serial = config.group.serial or hashlib.sha256(
            self.label.encode()).hexdigest()[:16]
        cache = cache_dir_for(config)
        self.members = [Member(m, cache) for m in config.members]
        self.sessions = SessionTable()
        self.objects = HandleMap()
        self.login = None               # CKU_USER / CKU_SO while logged in
        self._pin = None                # bytearray, wiped on logout/finalize
        self._rotation = itertools.count()
        self.lock = threading.RLock()
        self.events = threading.Condition()
        self.pending_event = False
        self.finalized = False

    # ---- life cycle ---------------------------------------------------------
    def start(self):
        problems = []
        for m in self.members:
            try:
                m.start()
            except P11Error as e:
                if e.rv == CKR.GENERAL_ERROR:      # configuration: module unusable
                    self.stop()
                    raise
                m.set_state("token not present", str(e))
                problems.append(str(e))
                log.error("%s", e)
        if not any(m.online for m in self.members):
            self.stop()
            raise P11Error(CKR.FUNCTION_FAILED, "no member could be started: "
                           + "; ".join(problems))

    def stop(self):
        self.finalized = True
        with self.events:
            self.events.notify_all()
        self._wipe_pin()
        for m in self.members:
            m.stop()

    # ---- members ------------------------------------------------------------
    @property
    def online(self):
        return [m for m in self.members if m.online]

    @property
    def primary(self) -> Member:
        for m in self.members:
            if m.online:
                return m
        raise P11Error(CKR.DEVICE_ERROR, "no member of the group is online")

    def pick(self, vs, *handles) -> Member:
        """The member for a new operation: the member of an operation already active
        in the session, else the least busy online member holding every object."""
        for m in vs.ops.values():
            return m
        best = None
        cands = self.online
        if not cands:
            raise P11Error(CKR.DEVICE_ERROR, "no member of the group is online")
        n = len(cands)
        start = next(self._rotation) % n
        for i in range(n):
            m = cands[(start + i) % n]
            if handles and not all(m.name in self.objects.holders(h) for h in handles
                                   if h in self.objects.to_member):
                continue
            if best is None or m.in_flight < best.in_flight:
                best = m
        return best or self.primary

    def member_session(self, vs, m) -> int:
        h = vs.members.get(m.name)
        if h is None:
            h = m.open_session(vs.flags)
            vs.members[m.name] = h
        return h

    def call(self, m, fname, *args) -> int:
        m.in_flight += 1
        try:
            return m.f[fname](*args)
        finally:
            m.in_flight -= 1
            m.served += 1

    # ---- slot and token -----------------------------------------------------
    def check_slot(self, slot):
        if slot != self.slot_id:
            raise P11Error(CKR.SLOT_ID_INVALID, f"slot {slot} is not the HA slot {self.slot_id}")

    def token_present(self) -> bool:
        return any(m.online for m in self.members)

    def slot_list(self, token_present: bool):
        if token_present and not self.token_present():
            return []
        return [self.slot_id]

    def fill_slot_info(self, info):
        info.slotDescription = pad(f"hashim HA slot: {self.label}", 64)
        info.manufacturerID = pad("hashim", 32)
        info.flags = CKF_REMOVABLE_DEVICE | (CKF_TOKEN_PRESENT if self.token_present() else 0)
        info.hardwareVersion = VERSION
        info.firmwareVersion = VERSION

    def fill_token_info(self, info):
        """The primary's token info under the group's identity; session counts are
        the application's own virtual sessions."""
        p = self.primary
        rv = self.call(p, "C_GetTokenInfo", p.slot, info)
        if rv != OK:
            raise P11Error(rv, f"member '{p.name}': C_GetTokenInfo failed")
        info.label = pad(self.label, 32)
        info.manufacturerID = pad("hashim", 32)
        info.model = pad("HA group", 16)
        info.serialNumber = pad(self.serial, 16)
        sessions = self.sessions.all()
        info.ulSessionCount = len(sessions)
        info.ulRwSessionCount = sum(1 for s in sessions if s.rw)

    def mechanism_list(self):
        p = self.primary
        count = ffi.new("CK_ULONG *")
        rv = self.call(p, "C_GetMechanismList", p.slot, ffi.NULL, count)
        if rv != OK:
            raise P11Error(rv)
        arr = ffi.new("CK_MECHANISM_TYPE[]", max(count[0], 1))
        rv = self.call(p, "C_GetMechanismList", p.slot, arr, count)
        if rv != OK:
            raise P11Error(rv)
        return [int(arr[i]) for i in range(count[0])]

    def mechanism_info(self, mech, info) -> int:
        p = self.primary
        return self.call(p, "C_GetMechanismInfo", p.slot, mech, info)

    # ---- sessions -----------------------------------------------------------
    def session(self, h):
        vs = self.sessions.get(h)
        if vs is None:
            raise P11Error(CKR.SESSION_HANDLE_INVALID)
        return vs

    def open_session(self, slot, flags) -> int:
        self.check_slot(slot)
        if not flags & CKF_SERIAL_SESSION:
            raise P11Error(CKR.SESSION_PARALLEL_NOT_SUPPORTED)
        if not self.token_present():
            raise P11Error(CKR.TOKEN_NOT_PRESENT, "no member of the group is online")
        if self.login == CKU_SO and not flags & CKF_RW_SESSION:
            raise P11Error(CKR.SESSION_READ_WRITE_SO_EXISTS)
        p = self.primary
        mh = p.open_session(flags)     # eager on the primary: its answer is the answer
        vs = self.sessions.new(flags)
        vs.members[p.name] = mh
        return vs.handle

    def close_session(self, h):
        with self.lock:
            vs = self.sessions.remove(h)
            if vs is None:
                raise P11Error(CKR.SESSION_HANDLE_INVALID)
            self._close_member_sessions(vs)
            if not self.sessions.by_handle:
                self._logged_out()

    def close_all_sessions(self, slot):
        self.check_slot(slot)
        with self.lock:
            for vs in self.sessions.all():
                self.sessions.remove(vs.handle)
                self._close_member_sessions(vs)
            self._logged_out()

    def _close_member_sessions(self, vs):
        for m in self.members:
            mh = vs.members.pop(m.name, None)
            if mh is not None and m.online:
                m.close_session(mh)

    # ---- login --------------------------------------------------------------
    def do_login(self, vs, user, pin: bytes | None, pin_ptr, pin_len) -> int:
        if user == CKU_CONTEXT_SPECIFIC:
            m = self.pick(vs)
            return self.call(m, "C_Login", self.member_session(vs, m), user, pin_ptr, pin_len)
        p = self.primary
        rv = self.call(p, "C_Login", self.member_session(vs, p), user, pin_ptr, pin_len)
        if rv != OK:
            return rv
        with self.lock:
            self.login = user
            self._wipe_pin()
            self._pin = bytearray(pin) if pin is not None else None
            for m in self.online:
                if m is p:
                    continue
                r = self.call(m, "C_Login", m.anchor, user, pin_ptr, pin_len)
                if r not in (OK, CKR.USER_ALREADY_LOGGED_IN):
                    log.error("member '%s': rejects the login the primary accepted (%s); "
                              "taken out of rotation", m.name, r)
                    m.set_state("device error", f"login rejected ({r:#x})")
        return OK

    def do_logout(self, vs) -> int:
        p = self.primary
        rv = self.call(p, "C_Logout", self.member_session(vs, p))
        if rv == OK:
            self._logged_out(skip=p)
        return rv

    def _logged_out(self, skip=None):
        if self.login is not None:
            for m in self.online:
                if m is not skip:
                    self.call(m, "C_Logout", m.anchor)
        self.login = None
        self._wipe_pin()

    def _wipe_pin(self):
        if self._pin is not None:
            for i in range(len(self._pin)):
                self._pin[i] = 0
            self._pin = None

    def fanout_pin_change(self, vs, fname, *args) -> int:
        """C_InitPIN / C_SetPIN: on the primary, then on every other online member."""
        p = self.primary
        rv = self.call(p, fname, self.member_session(vs, p), *args)
        if rv == OK:
            for m in self.online:
                if m is not p:
                    r = self.call(m, fname, self.member_session(vs, m), *args)
                    if r != OK:
                        log.error("member '%s': %s failed (%#x) after the primary changed "
                                  "the PIN", m.name, fname, r)
        return rv

    # ---- routing helpers ------------------------------------------------------
    def on_primary(self, vs, fname, *args) -> int:
        p = self.primary
        return self.call(p, fname, self.member_session(vs, p), *args)

    def handle(self, vh, m) -> int:
        return self.objects.member(vh, m.name)

    def new_object(self, m, mh) -> int:
        return self.objects.virtual(m.name, mh)

    # ---- slot events --------------------------------------------------------
    def wait_for_event(self, block: bool):
        with self.events:
            while not self.pending_event:
                if self.finalized:
                    raise P11Error(CKR.CRYPTOKI_NOT_INITIALIZED)
                if not block:
                    raise P11Error(CKR.NO_EVENT)
                self.events.wait(1.0)
            self.pending_event = False
            return self.slot_id

    def post_event(self):
        with self.events:
            self.pending_event = True
            self.events.notify_all()
