"""Return codes that mean the member, not the request, is in trouble: the member
fails over (shim/members/member.py, and the C fast path in native/fastpath.c).
Lost sessions count: hashim only ever passes a member session handles that member
gave it, so CKR_SESSION_HANDLE_INVALID there means the member restarted under us."""
from .constants import CKR

DEVICE_LEVEL = frozenset({
    CKR.DEVICE_ERROR, CKR.DEVICE_REMOVED, CKR.DEVICE_MEMORY, CKR.TOKEN_NOT_PRESENT,
    CKR.TOKEN_NOT_RECOGNIZED, CKR.CRYPTOKI_NOT_INITIALIZED, CKR.SESSION_HANDLE_INVALID,
    CKR.SESSION_CLOSED,
})
