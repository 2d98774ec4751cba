"""C <-> Python marshalling of every PKCS#11 entry point.

The C stub (native/build_stub.py) calls ``py_<function>`` for each function of
shim/spec/functions.py; ``install`` binds them here. Each handler checks pointers
(CKR_ARGUMENTS_BAD), converts structures, and routes through the HA group
(shim/engine/group.py). Output buffers are handed to the member as they came, so the
"NULL buffer asks for the length / CKR_BUFFER_TOO_SMALL" rule holds exactly as the
member applies it. A P11Error becomes its CK_RV here and nowhere else.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

from .errors import P11Error, rv_name
from .members.module import ffi as mffi
from .spec import constants as K
from .spec.constants import CKR, CKR_OK
from .spec.functions import FUNCTIONS_V3, IN_C
from .spec.mechanisms import HANDLE_PARAMS

log = logging.getLogger("hashim")

OK = CKR_OK
ARGUMENTS_BAD = CKR.ARGUMENTS_BAD
BUFFER_TOO_SMALL = CKR.BUFFER_TOO_SMALL
NOT_INITIALIZED_OP = CKR.OPERATION_NOT_INITIALIZED
MAGIC = 0x6A5F1

sffi = None           # the stub's embedding FFI (set by install)
NULL = None
ENGINE = None         # the running Group between C_Initialize and C_Finalize
_init_lock = threading.Lock()

M_MECH = mffi.typeof("CK_MECHANISM_PTR")
M_ATTR = mffi.typeof("CK_ATTRIBUTE_PTR")
M_TOKEN_INFO = mffi.typeof("CK_TOKEN_INFO_PTR")
M_MECH_INFO = mffi.typeof("CK_MECHANISM_INFO_PTR")


def bad(reason: str):
    return P11Error(ARGUMENTS_BAD, reason)


def pad(text: str, n: int) -> bytes:
    b = text.encode()[:n]
    return b + b" " * (n - len(b))


def put_list(values, p_list, p_count) -> int:
    """The PKCS#11 list-output rule: NULL list -> count; short list -> BUFFER_TOO_SMALL."""
    if p_count == NULL:
        raise bad("count pointer is NULL")
    n = len(values)
    if p_list == NULL:
        p_count[0] = n
        return OK
    if p_count[0] < n:
        p_count[0] = n
        return BUFFER_TOO_SMALL
    for i, v in enumerate(values):
        p_list[i] = v
    p_count[0] = n
    return OK


def need(ptr, what):
    if ptr == NULL:
        raise bad(f"{what} is NULL")


def need_buf(ptr, length, what):
    if ptr == NULL and length:
        raise bad(f"{what} is NULL with length {length}")


def tmpl(g, p, count):
    need_buf(p, count, "template")
    return mffi.cast(M_ATTR, p)


def mech(g, m, p):
    """The application's mechanism for member ``m``: as it came, unless its
    parameter holds an object handle, which is translated."""
    need(p, "mechanism")
    if p.mechanism in HANDLE_PARAMS and p.pParameter != NULL \
            and p.ulParameterLen == mffi.sizeof("CK_OBJECT_HANDLE"):
        vh = sffi.cast("CK_OBJECT_HANDLE *", p.pParameter)[0]
        param = mffi.new("CK_OBJECT_HANDLE *", g.handle(vh, m))
        mm = mffi.new("CK_MECHANISM *", {"mechanism": p.mechanism, "pParameter": param,
                                        "ulParameterLen": p.ulParameterLen})
        mm._keep = param
        return mm
    return mffi.cast(M_MECH, p)


# ---- general purpose --------------------------------------------------------------
def C_Initialize(g, pInitArgs):
    global ENGINE
    from . import config as configmod
    from .logs import setup_logging
    with _init_lock:
        if ENGINE is not None:
            return CKR.CRYPTOKI_ALREADY_INITIALIZED
        if pInitArgs != NULL:
            a = sffi.cast("CK_C_INITIALIZE_ARGS_PTR", pInitArgs)
            given = [f != NULL for f in (a.CreateMutex, a.DestroyMutex, a.LockMutex,
                                         a.UnlockMutex)]
            if any(given) and not all(given):
                raise bad("C_Initialize: some but not all mutex functions supplied")
            if a.pReserved != NULL:
                raise bad("C_Initialize: pReserved must be NULL")
            if a.flags & K.CKF_LIBRARY_CANT_CREATE_OS_THREADS:
                raise P11Error(CKR.NEED_TO_CREATE_THREADS,
                               "hashim supervises members from its own threads")
            # Application mutex callbacks, with or without CKF_OS_LOCKING_OK: hashim's
            # locks are the operating system's (the same primitives such callbacks wrap).
        try:
            config = configmod.load(configmod.default_path())
        except configmod.ConfigError as e:
            print(f"hashim: {e}", file=sys.stderr, flush=True)
            raise P11Error(CKR.GENERAL_ERROR, str(e))
        setup_logging(config)
        from .engine.group import Group
        group = Group(config)
        try:
            group.start()
        except P11Error as e:
            print(f"hashim: {config.path}: {e.reason}", file=sys.stderr, flush=True)
            raise
        ENGINE = group
        log.info("initialised: group '%s', members %s, pid %d", config.group.label,
                 ", ".join(f"{m.name} ({m.state})" for m in group.members), os.getpid())
        return OK


def C_Finalize(g, pReserved):
    global ENGINE
    if pReserved != NULL:
        raise bad("C_Finalize: pReserved must be NULL")
    with _init_lock:
        if ENGINE is None:
            return CKR.CRYPTOKI_NOT_INITIALIZED
        ENGINE = None
    g.stop()
    log.info("finalised (pid %d)", os.getpid())
    return OK


def C_GetInfo(g, pInfo):
    need(pInfo, "pInfo")
    pInfo.cryptokiVersion.major, pInfo.cryptokiVersion.minor = 2, 40
    sffi.memmove(pInfo.manufacturerID, pad("hashim", 32), 32)
    pInfo.flags = 0
    sffi.memmove(pInfo.libraryDescription, pad("hashim HA PKCS#11 module", 32), 32)
    pInfo.libraryVersion.major, pInfo.libraryVersion.minor = g_version()
    return OK


def g_version():
    from .engine.group import VERSION
    return VERSION


# ---- slots and tokens ----------------------------------------------------------------
def C_GetSlotList(g, tokenPresent, pSlotList, pulCount):
    return put_list(g.slot_list(bool(tokenPresent)), pSlotList, pulCount)


def C_GetSlotInfo(g, slotID, pInfo):
    g.check_slot(slotID)
    need(pInfo, "pInfo")
    sffi.memmove(pInfo.slotDescription, pad(f"hashim HA slot: {g.label}", 64), 64)
    sffi.memmove(pInfo.manufacturerID, pad("hashim", 32), 32)
    pInfo.flags = K.CKF_REMOVABLE_DEVICE | (K.CKF_TOKEN_PRESENT if g.token_present() else 0)
    for v in (pInfo.hardwareVersion, pInfo.firmwareVersion):
        v.major, v.minor = g_version()
    return OK


def C_GetTokenInfo(g, slotID, pInfo):
    g.check_slot(slotID)
    need(pInfo, "pInfo")
    if not g.token_present():
        raise P11Error(CKR.TOKEN_NOT_PRESENT, "no member of the group is online")
    g.fill_token_info(mffi.cast(M_TOKEN_INFO, pInfo))
    return OK


def C_GetMechanismList(g, slotID, pMechanismList, pulCount):
    g.check_slot(slotID)
    need(pulCount, "pulCount")
    if not g.token_present():
        raise P11Error(CKR.TOKEN_NOT_PRESENT, "no member of the group is online")
    return put_list(g.mechanism_list(), pMechanismList, pulCount)


def C_GetMechanismInfo(g, slotID, type, pInfo):
    g.check_slot(slotID)
    need(pInfo, "pInfo")
    if not g.token_present():
        raise P11Error(CKR.TOKEN_NOT_PRESENT, "no member of the group is online")
    return g.mechanism_info(type, mffi.cast(M_MECH_INFO, pInfo))


def C_InitToken(g, slotID, pPin, ulPinLen, pLabel):
    g.check_slot(slotID)
    raise P11Error(CKR.FUNCTION_NOT_SUPPORTED, "the HA slot's tokens are initialised on "
                   "each member with its own tools, then joined with 'hashim group add-member'")


def C_InitPIN(g, hSession, pPin, ulPinLen):
    need_buf(pPin, ulPinLen, "pPin")
    return g.fanout_pin_change(g.session(hSession), "C_InitPIN", pPin, ulPinLen)


def C_SetPIN(g, hSession, pOldPin, ulOldLen, pNewPin, ulNewLen):
    need_buf(pOldPin, ulOldLen, "pOldPin")
    need_buf(pNewPin, ulNewLen, "pNewPin")
    rv = g.fanout_pin_change(g.session(hSession), "C_SetPIN", pOldPin, ulOldLen,
                             pNewPin, ulNewLen)
    if rv == OK and g.login == K.CKU_USER and pNewPin != NULL:
        g._wipe_pin()
        g._pin = bytearray(sffi.buffer(pNewPin, ulNewLen))
    return rv


# ---- sessions ---------------------------------------------------------------------------
def C_OpenSession(g, slotID, flags, pApplication, Notify, phSession):
    need(phSession, "phSession")
    phSession[0] = g.open_session(slotID, flags)
    return OK


def C_CloseSession(g, hSession):
    g.close_session(hSession)
    return OK


def C_CloseAllSessions(g, slotID):
    g.close_all_sessions(slotID)
    return OK


def C_GetSessionInfo(g, hSession, pInfo):
    need(pInfo, "pInfo")
    vs = g.session(hSession)
    pInfo.slotID = g.slot_id
    pInfo.state = vs.state(g.login)
    pInfo.flags = vs.flags
    pInfo.ulDeviceError = 0
    return OK


def C_GetOperationState(g, hSession, pOperationState, pulOperationStateLen):
    need(pulOperationStateLen, "pulOperationStateLen")
    vs = g.session(hSession)
    m = g.pick(vs)
    return g.call(m, "C_GetOperationState", g.member_session(vs, m), pOperationState,
                  pulOperationStateLen)


def C_SetOperationState(g, hSession, pOperationState, ulOperationStateLen,
                        hEncryptionKey, hAuthenticationKey):
    need_buf(pOperationState, ulOperationStateLen, "pOperationState")
    vs = g.session(hSession)
    m = g.pick(vs)
    return g.call(m, "C_SetOperationState", g.member_session(vs, m), pOperationState,
                  ulOperationStateLen, g.handle(hEncryptionKey, m),
                  g.handle(hAuthenticationKey, m))


def C_Login(g, hSession, userType, pPin, ulPinLen):
    need_buf(pPin, ulPinLen, "pPin")
    vs = g.session(hSession)
    pin = bytes(sffi.buffer(pPin, ulPinLen)) if pPin != NULL else None
    return g.do_login(vs, userType, pin, pPin, ulPinLen)


def C_LoginUser(g, hSession, userType, pPin, ulPinLen, pUsername, ulUsernameLen):
    if pUsername != NULL and ulUsernameLen:
        raise P11Error(CKR.FUNCTION_NOT_SUPPORTED, "C_LoginUser with a user name")
    return C_Login(g, hSession, userType, pPin, ulPinLen)


def C_Logout(g, hSession):
    return g.do_logout(g.session(hSession))


# ---- objects --------------------------------------------------------------------------
def _created(g, m, rv, out, ph):
    if rv == OK:
        ph[0] = g.new_object(m, out[0])
    return rv


def C_CreateObject(g, hSession, pTemplate, ulCount, phObject):
    need(phObject, "phObject")
    t = tmpl(g, pTemplate, ulCount)
    vs = g.session(hSession)
    p = g.primary
    out = mffi.new("CK_OBJECT_HANDLE *")
    rv = g.call(p, "C_CreateObject", g.member_session(vs, p), t, ulCount, out)
    return _created(g, p, rv, out, phObject)


def C_CopyObject(g, hSession, hObject, pTemplate, ulCount, phNewObject):
    need(phNewObject, "phNewObject")
    t = tmpl(g, pTemplate, ulCount)
    vs = g.session(hSession)
    p = g.primary
    out = mffi.new("CK_OBJECT_HANDLE *")
    rv = g.call(p, "C_CopyObject", g.member_session(vs, p), g.handle(hObject, p), t,
                ulCount, out)
    return _created(g, p, rv, out, phNewObject)


def C_DestroyObject(g, hSession, hObject):
    vs = g.session(hSession)
    p = g.primary
    rv = g.call(p, "C_DestroyObject", g.member_session(vs, p), g.handle(hObject, p))
    if rv == OK:
        g.objects.forget(hObject)
    return rv


def _reader(g, vs, vh):
    m = g.pick(vs, vh) if not vs.ops else g.primary
    return m, g.member_session(vs, m), g.handle(vh, m)


def C_GetObjectSize(g, hSession, hObject, pulSize):
    need(pulSize, "pulSize")
    m, ms, mh = _reader(g, g.session(hSession), hObject)
    return g.call(m, "C_GetObjectSize", ms, mh, pulSize)


def C_GetAttributeValue(g, hSession, hObject, pTemplate, ulCount):
    t = tmpl(g, pTemplate, ulCount)
    m, ms, mh = _reader(g, g.session(hSession), hObject)
    return g.call(m, "C_GetAttributeValue", ms, mh, t, ulCount)


def C_SetAttributeValue(g, hSession, hObject, pTemplate, ulCount):
    t = tmpl(g, pTemplate, ulCount)
    vs = g.session(hSession)
    p = g.primary
    return g.call(p, "C_SetAttributeValue", g.member_session(vs, p), g.handle(hObject, p),
                  t, ulCount)


def C_FindObjectsInit(g, hSession, pTemplate, ulCount):
    t = tmpl(g, pTemplate, ulCount)
    vs = g.session(hSession)
    if vs.find is not None:
        raise P11Error(CKR.OPERATION_ACTIVE, "a search is already active in this session")
    p = g.primary
    rv = g.call(p, "C_FindObjectsInit", g.member_session(vs, p), t, ulCount)
    if rv == OK:
        vs.find = p
    return rv


def C_FindObjects(g, hSession, phObject, ulMaxObjectCount, pulObjectCount):
    need(pulObjectCount, "pulObjectCount")
    need_buf(phObject, ulMaxObjectCount, "phObject")
    vs = g.session(hSession)
    m = vs.find
    if m is None:
        raise P11Error(NOT_INITIALIZED_OP, "C_FindObjects without C_FindObjectsInit")
    out = mffi.new("CK_OBJECT_HANDLE[]", max(ulMaxObjectCount, 1))
    rv = g.call(m, "C_FindObjects", vs.members[m.name], out, ulMaxObjectCount,
                pulObjectCount)
    if rv == OK:
        for i in range(pulObjectCount[0]):
            phObject[i] = g.new_object(m, out[i])
    return rv


def C_FindObjectsFinal(g, hSession):
    vs = g.session(hSession)
    m = vs.find
    if m is None:
        raise P11Error(NOT_INITIALIZED_OP, "C_FindObjectsFinal without C_FindObjectsInit")
    vs.find = None
    return g.call(m, "C_FindObjectsFinal", vs.members[m.name])


# ---- cryptographic operations, by shape (one handler per family) -------------------------
def op_init(kind, fname, with_key=True):
    def handler(g, hSession, pMechanism, hKey=None):
        need(pMechanism, "pMechanism")
        vs = g.session(hSession)
        if with_key:
            m = g.pick(vs, hKey)
            args = (mech(g, m, pMechanism), g.handle(hKey, m))
        else:
            m = g.pick(vs)
            args = (mech(g, m, pMechanism),)
        rv = g.call(m, fname, g.member_session(vs, m), *args)
        if rv == OK:
            vs.ops[kind] = m
        return rv
    return handler


def _op_member(vs, kind):
    m = vs.ops.get(kind)
    if m is None:
        raise P11Error(NOT_INITIALIZED_OP)
    return m


def op_single(kind, fname):
    """(in, out) single-part and final calls: the operation ends unless the call was a
    length query or answered CKR_BUFFER_TOO_SMALL."""
    def handler(g, hSession, pIn, ulInLen, pOut, pulOutLen):
        need_buf(pIn, ulInLen, "input")
        need(pulOutLen, "output length pointer")
        vs = g.session(hSession)
        m = _op_member(vs, kind)
        rv = g.call(m, fname, vs.members[m.name], pIn, ulInLen, pOut, pulOutLen)
        if not (rv == BUFFER_TOO_SMALL or (rv == OK and pOut == NULL)):
            vs.ops.pop(kind, None)
        return rv
    return handler


def op_final(kind, fname):
    def handler(g, hSession, pOut, pulOutLen):
        need(pulOutLen, "output length pointer")
        vs = g.session(hSession)
        m = _op_member(vs, kind)
        rv = g.call(m, fname, vs.members[m.name], pOut, pulOutLen)
        if not (rv == BUFFER_TOO_SMALL or (rv == OK and pOut == NULL)):
            vs.ops.pop(kind, None)
        return rv
    return handler


def op_update(kinds, fname, with_output):
    """Multi-part updates: pinned to the member of the operation; an error ends it."""
    def handler(g, hSession, pIn, ulInLen, *out):
        need_buf(pIn, ulInLen, "input")
        if with_output:
            need(out[1], "output length pointer")
        vs = g.session(hSession)
        m = _op_member(vs, kinds[0])
        for k in kinds[1:]:
            _op_member(vs, k)
        rv = g.call(m, fname, vs.members[m.name], pIn, ulInLen, *out)
        if rv != OK and rv != BUFFER_TOO_SMALL:
            for k in kinds:
                vs.ops.pop(k, None)
        return rv
    return handler


def op_verify(kind, fname, with_data):
    def handler(g, hSession, *args):
        if with_data:
            need_buf(args[0], args[1], "data")
        need_buf(args[-2], args[-1], "signature")
        vs = g.session(hSession)
        m = _op_member(vs, kind)
        rv = g.call(m, fname, vs.members[m.name], *args)
        vs.ops.pop(kind, None)
        return rv
    return handler


def C_DigestKey(g, hSession, hKey):
    vs = g.session(hSession)
    m = _op_member(vs, "digest")
    rv = g.call(m, "C_DigestKey", vs.members[m.name], g.handle(hKey, m))
    if rv != OK:
        vs.ops.pop("digest", None)
    return rv


# ---- key management ---------------------------------------------------------------
def C_GenerateKey(g, hSession, pMechanism, pTemplate, ulCount, phKey):
    need(phKey, "phKey")
    t = tmpl(g, pTemplate, ulCount)
    vs = g.session(hSession)
    p = g.primary
    out = mffi.new("CK_OBJECT_HANDLE *")
    rv = g.call(p, "C_GenerateKey", g.member_session(vs, p), mech(g, p, pMechanism), t,
                ulCount, out)
    return _created(g, p, rv, out, phKey)


def C_GenerateKeyPair(g, hSession, pMechanism, pPublicKeyTemplate, ulPublicKeyAttributeCount,
                      pPrivateKeyTemplate, ulPrivateKeyAttributeCount, phPublicKey,
                      phPrivateKey):
    need(phPublicKey, "phPublicKey")
    need(phPrivateKey, "phPrivateKey")
    pub = tmpl(g, pPublicKeyTemplate, ulPublicKeyAttributeCount)
    priv = tmpl(g, pPrivateKeyTemplate, ulPrivateKeyAttributeCount)
    vs = g.session(hSession)
    p = g.primary
    out = mffi.new("CK_OBJECT_HANDLE[2]")
    rv = g.call(p, "C_GenerateKeyPair", g.member_session(vs, p), mech(g, p, pMechanism),
                pub, ulPublicKeyAttributeCount, priv, ulPrivateKeyAttributeCount,
                out, out + 1)
    if rv == OK:
        phPublicKey[0] = g.new_object(p, out[0])
        phPrivateKey[0] = g.new_object(p, out[1])
    return rv


def C_WrapKey(g, hSession, pMechanism, hWrappingKey, hKey, pWrappedKey, pulWrappedKeyLen):
    need(pulWrappedKeyLen, "pulWrappedKeyLen")
    vs = g.session(hSession)
    m = g.pick(vs, hWrappingKey, hKey) if not vs.ops else g.primary
    return g.call(m, "C_WrapKey", g.member_session(vs, m), mech(g, m, pMechanism),
                  g.handle(hWrappingKey, m), g.handle(hKey, m), pWrappedKey,
                  pulWrappedKeyLen)


def C_UnwrapKey(g, hSession, pMechanism, hUnwrappingKey, pWrappedKey, ulWrappedKeyLen,
                pTemplate, ulAttributeCount, phKey):
    need(phKey, "phKey")
    need_buf(pWrappedKey, ulWrappedKeyLen, "pWrappedKey")
    t = tmpl(g, pTemplate, ulAttributeCount)
    vs = g.session(hSession)
    p = g.primary
    out = mffi.new("CK_OBJECT_HANDLE *")
    rv = g.call(p, "C_UnwrapKey", g.member_session(vs, p), mech(g, p, pMechanism),
                g.handle(hUnwrappingKey, p), pWrappedKey, ulWrappedKeyLen, t,
                ulAttributeCount, out)
    return _created(g, p, rv, out, phKey)


def C_DeriveKey(g, hSession, pMechanism, hBaseKey, pTemplate, ulAttributeCount, phKey):
    need(phKey, "phKey")
    t = tmpl(g, pTemplate, ulAttributeCount)
    vs = g.session(hSession)
    p = g.primary
    out = mffi.new("CK_OBJECT_HANDLE *")
    rv = g.call(p, "C_DeriveKey", g.member_session(vs, p), mech(g, p, pMechanism),
                g.handle(hBaseKey, p), t, ulAttributeCount, out)
    return _created(g, p, rv, out, phKey)


# ---- random, legacy, events ------------------------------------------------------------
def C_SeedRandom(g, hSession, pSeed, ulSeedLen):
    need_buf(pSeed, ulSeedLen, "pSeed")
    vs = g.session(hSession)
    m = g.pick(vs)
    return g.call(m, "C_SeedRandom", g.member_session(vs, m), pSeed, ulSeedLen)


def C_GenerateRandom(g, hSession, RandomData, ulRandomLen):
    need_buf(RandomData, ulRandomLen, "RandomData")
    vs = g.session(hSession)
    m = g.pick(vs)
    return g.call(m, "C_GenerateRandom", g.member_session(vs, m), RandomData, ulRandomLen)


def C_GetFunctionStatus(g, hSession):
    g.session(hSession)
    return CKR.FUNCTION_NOT_PARALLEL


def C_CancelFunction(g, hSession):
    g.session(hSession)
    return CKR.FUNCTION_NOT_PARALLEL


def C_WaitForSlotEvent(g, flags, pSlot, pReserved):
    need(pSlot, "pSlot")
    if pReserved != NULL:
        raise bad("C_WaitForSlotEvent: pReserved must be NULL")
    pSlot[0] = g.wait_for_event(block=not flags & K.CKF_DONT_BLOCK)
    return OK


def not_supported(g, *args):
    return CKR.FUNCTION_NOT_SUPPORTED


HANDLERS = {name: obj for name, obj in globals().items() if name.startswith("C_")}
HANDLERS.update({
    "C_EncryptInit": op_init("encrypt", "C_EncryptInit"),
    "C_DecryptInit": op_init("decrypt", "C_DecryptInit"),
    "C_DigestInit": op_init("digest", "C_DigestInit", with_key=False),
    "C_SignInit": op_init("sign", "C_SignInit"),
    "C_SignRecoverInit": op_init("signrecover", "C_SignRecoverInit"),
    "C_VerifyInit": op_init("verify", "C_VerifyInit"),
    "C_VerifyRecoverInit": op_init("verifyrecover", "C_VerifyRecoverInit"),
    "C_Encrypt": op_single("encrypt", "C_Encrypt"),
    "C_Decrypt": op_single("decrypt", "C_Decrypt"),
    "C_Digest": op_single("digest", "C_Digest"),
    "C_Sign": op_single("sign", "C_Sign"),
    "C_SignRecover": op_single("signrecover", "C_SignRecover"),
    "C_VerifyRecover": op_single("verifyrecover", "C_VerifyRecover"),
    "C_EncryptFinal": op_final("encrypt", "C_EncryptFinal"),
    "C_DecryptFinal": op_final("decrypt", "C_DecryptFinal"),
    "C_DigestFinal": op_final("digest", "C_DigestFinal"),
    "C_SignFinal": op_final("sign", "C_SignFinal"),
    "C_EncryptUpdate": op_update(("encrypt",), "C_EncryptUpdate", True),
    "C_DecryptUpdate": op_update(("decrypt",), "C_DecryptUpdate", True),
    "C_DigestUpdate": op_update(("digest",), "C_DigestUpdate", False),
    "C_SignUpdate": op_update(("sign",), "C_SignUpdate", False),
    "C_VerifyUpdate": op_update(("verify",), "C_VerifyUpdate", False),
    "C_DigestEncryptUpdate": op_update(("digest", "encrypt"), "C_DigestEncryptUpdate", True),
    "C_DecryptDigestUpdate": op_update(("decrypt", "digest"), "C_DecryptDigestUpdate", True),
    "C_SignEncryptUpdate": op_update(("sign", "encrypt"), "C_SignEncryptUpdate", True),
    "C_DecryptVerifyUpdate": op_update(("decrypt", "verify"), "C_DecryptVerifyUpdate", True),
    "C_Verify": op_verify("verify", "C_Verify", True),
    "C_VerifyFinal": op_verify("verify", "C_VerifyFinal", False),
})
# Before C_Initialize (or after C_Finalize) only these may run.
NO_ENGINE_NEEDED = {"C_Initialize", "C_GetInfo"}


def _entry(name, handler):
    needs_engine = name not in NO_ENGINE_NEEDED

    def entry(*args):
        g = ENGINE
        if g is None and needs_engine:
            return CKR.CRYPTOKI_NOT_INITIALIZED
        try:
            return handler(g, *args)
        except P11Error as e:
            if e.reason:
                log.info("%s -> %s", name, e)
            return e.rv
        except Exception:
            log.exception("%s: internal error (answered CKR_GENERAL_ERROR)", name)
            return CKR.GENERAL_ERROR
    entry.__name__ = name
    return entry


def _after_fork_in_child():
    """A forked child starts uninitialised: it must call C_Initialize again. The
    parent's members and sessions are dropped, not finalised (they are the parent's)."""
    global ENGINE, _init_lock
    ENGINE = None
    _init_lock = threading.Lock()


def install(ffi, lib):
    global sffi, NULL
    sffi, NULL = ffi, ffi.NULL
    for f in FUNCTIONS_V3:
        if f.name in IN_C:
            continue
        ffi.def_extern(name="py_" + f.name, error=CKR.GENERAL_ERROR)(
            _entry(f.name, HANDLERS.get(f.name, not_supported)))
    ffi.def_extern(name="py_hashim_hello", error=0)(lambda: MAGIC)
    os.register_at_fork(after_in_child=_after_fork_in_child)
