"""The one exception type of the engine. Every failure that reaches an application
becomes a P11Error, and shim/frontend.py turns it into the CK_RV (one place)."""
from __future__ import annotations

from .spec.constants import CKR


def rv_name(rv: int) -> str:
    try:
        return "CKR_" + CKR(rv).name
    except ValueError:
        return f"CKR_{rv:#x}"


class P11Error(Exception):
    """A PKCS#11 return code with a reason for the log (never a PIN or key material)."""

    def __init__(self, rv: int, reason: str = ""):
        super().__init__(rv, reason)
        self.rv = int(rv)
        self.reason = reason

    def __str__(self) -> str:
        return f"{rv_name(self.rv)}: {self.reason}" if self.reason else rv_name(self.rv)
