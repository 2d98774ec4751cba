"""A member of the HA group: its module, its token's slot, its state and counters."""
from __future__ import annotations

import logging
import os
import threading
import time

from ..errors import P11Error
from ..spec.constants import CKF_RW_SESSION, CKF_SERIAL_SESSION, CKR_OK
from .module import Module, ffi, private_copy

log = logging.getLogger("hashim")

ONLINE = "online"
DEVICE_ERROR = "device error"
TOKEN_NOT_PRESENT = "token not present"
RECOVERING = "recovering"
GIVEN_UP = "given up"


class Member:
    def __init__(self, cfg, cache_dir: str):
        self.cfg = cfg
        self.name = cfg.name
        path = cfg.module
        if cfg.private_instance:
            path = private_copy(cfg.module, cfg.name, cache_dir)
        self.module = Module(cfg.name, path, cfg.env)
        self.f = {}
        self.slot = None
        self.anchor = None            # a session kept open: searches, probes, login
        self.state = TOKEN_NOT_PRESENT
        self.in_flight = 0
        self.served = 0
        self.failed_over = 0
        self.last_error = None
        self.last_change = time.time()
        self.lock = threading.Lock()

    def start(self):
        """Load, initialise, find the token, open the anchor session."""
        self.module.initialize()
        self.f = self.module.f
        self.slot = self.module.find_slot(self.cfg.token_label, self.cfg.token_serial)
        self.anchor = self.open_session(CKF_SERIAL_SESSION | CKF_RW_SESSION)
        self.set_state(ONLINE)

    def stop(self):
        self.anchor = None
        self.module.finalize()

    def set_state(self, state, error=None):
        if state != self.state:
            log.info("member '%s': %s -> %s%s", self.name, self.state, state,
                     f" ({error})" if error else "")
            self.state = state
            self.last_change = time.time()
        if error:
            self.last_error = error

    @property
    def online(self) -> bool:
        return self.state == ONLINE

    def open_session(self, flags) -> int:
        h = ffi.new("CK_SESSION_HANDLE *")
        rv = self.f["C_OpenSession"](self.slot, flags, ffi.NULL, ffi.NULL, h)
        if rv != CKR_OK:
            raise P11Error(rv, f"member '{self.name}': C_OpenSession failed")
        return int(h[0])

    def close_session(self, h: int) -> int:
        return self.f["C_CloseSession"](h)
