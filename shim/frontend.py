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

from . import native
from .errors import P11Error
from .members.member import MemberDown
from .members.module import ffi as mffi
from .spec import constants as K
from .spec.constants import CKR, CKR_OK
from .spec.functions import FUNCTIONS_V3, IN_C
from .engine.group import VERSION, pad
from .engine.mechanism import Mechanism
from .members.objects import ATTR_SIZE, c_template
from .spec.attributes import TEMPLATE_ATTRS
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


def bad(reason: str):
    return P11Error(ARGUMENTS_BAD, reason)


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
    native.reset()
    log.info("finalised (pid %d)", os.getpid())
    return OK


def C_GetInfo(g, pInfo):
    need(pInfo, "pInfo")
    pInfo.cryptokiVersion.major, pInfo.cryptokiVersion.minor = 2, 40
    sffi.memmove(pInfo.manufacturerID, pad("hashim", 32), 32)
    pInfo.flags = 0
    sffi.memmove(pInfo.libraryDescription, pad("hashim HA PKCS#11 module", 32), 32)
    pInfo.libraryVersion.major, pInfo.libraryVersion.minor = VERSION
    return OK


# ---- slots and tokens ----------------------------------------------------------------
def C_GetSlotList(g, tokenPresent, pSlotList, pulCount):
    return put_list(g.slot_list(bool(tokenPresent)), pSlotList, pulCount)


def on_member_slot(g, slotID, fname, *args):
    """ha_only = false: a call on a member's own slot goes to that member as it is
    (None when ``slotID`` is not a member's slot)."""
    m = g.member_slot(slotID)
    if m is None:
        return None
    if m.state != "online":
        raise P11Error(CKR.TOKEN_NOT_PRESENT if fname != "C_GetSlotInfo" else CKR.DEVICE_ERROR,
                       f"member '{m.name}' is not online")
    return m.call(fname, m.slot, *args)


def C_GetSlotInfo(g, slotID, pInfo):
    need(pInfo, "pInfo")
    rv = on_member_slot(g, slotID, "C_GetSlotInfo", mffi.cast("CK_SLOT_INFO *", pInfo))
    if rv is not None:
        return rv
    g.check_slot(slotID)
    sffi.memmove(pInfo.slotDescription, pad(f"hashim HA slot: {g.label}", 64), 64)
    sffi.memmove(pInfo.manufacturerID, pad("hashim", 32), 32)
    pInfo.flags = K.CKF_TOKEN_PRESENT if g.token_present() else 0
    for v in (pInfo.hardwareVersion, pInfo.firmwareVersion):
        v.major, v.minor = VERSION
    return OK


def _token(g, slotID):
    g.check_slot(slotID)
    if not g.token_present():
        raise P11Error(CKR.TOKEN_NOT_PRESENT, "no member of the group is online")


def C_GetTokenInfo(g, slotID, pInfo):
    need(pInfo, "pInfo")
    rv = on_member_slot(g, slotID, "C_GetTokenInfo", mffi.cast(M_TOKEN_INFO, pInfo))
    if rv is not None:
        return rv
    _token(g, slotID)
    g.fill_token_info(mffi.cast(M_TOKEN_INFO, pInfo))
    return OK


def C_GetMechanismList(g, slotID, pMechanismList, pulCount):
    need(pulCount, "pulCount")
    rv = on_member_slot(g, slotID, "C_GetMechanismList", pMechanismList, pulCount)
    if rv is not None:
        return rv
    _token(g, slotID)
    return put_list(sorted(g.mechanisms()), pMechanismList, pulCount)


def C_GetMechanismInfo(g, slotID, type, pInfo):
    need(pInfo, "pInfo")
    rv = on_member_slot(g, slotID, "C_GetMechanismInfo", type,
                        mffi.cast("CK_MECHANISM_INFO *", pInfo))
    if rv is not None:
        return rv
    _token(g, slotID)
    info = g.mechanisms().get(type)
    if info is None:
        raise P11Error(CKR.MECHANISM_INVALID, f"mechanism {type:#x} is not supported by "
                       "every member of the group")
    pInfo.ulMinKeySize, pInfo.ulMaxKeySize, pInfo.flags = info
    return OK


def C_InitToken(g, slotID, pPin, ulPinLen, pLabel):
    rv = on_member_slot(g, slotID, "C_InitToken", pPin, ulPinLen, pLabel)
    if rv is not None:
        return rv
    g.check_slot(slotID)
    raise P11Error(CKR.FUNCTION_NOT_SUPPORTED, "the HA slot's tokens are initialised on "
                   "each member with its own tools, then joined with 'hashim group add-member'")


def C_InitPIN(g, hSession, pPin, ulPinLen):
    need_buf(pPin, ulPinLen, "pPin")
    return g.fanout(g.session(hSession), "C_InitPIN", lambda m: (pPin, ulPinLen))


def C_SetPIN(g, hSession, pOldPin, ulOldLen, pNewPin, ulNewLen):
    need_buf(pOldPin, ulOldLen, "pOldPin")
    need_buf(pNewPin, ulNewLen, "pNewPin")
    rv = g.fanout(g.session(hSession), "C_SetPIN",
                  lambda m: (pOldPin, ulOldLen, pNewPin, ulNewLen))
    if rv == OK and g.login == K.CKU_USER and pNewPin != NULL:
        g.set_pin(bytes(sffi.buffer(pNewPin, ulNewLen)))
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
    if vs.direct is not None:
        m = g.lead(vs)
        rv = m.call("C_GetSessionInfo", vs.members.get(m.name, 0),
                    mffi.cast("CK_SESSION_INFO *", pInfo))
        pInfo.slotID = g.slot_id + 1 + g.members.index(m)
        return rv
    pInfo.slotID = g.slot_id
    pInfo.state = vs.state(g.login)
    pInfo.flags = vs.flags
    pInfo.ulDeviceError = 0
    return OK


def C_GetOperationState(g, hSession, pOperationState, pulOperationStateLen):
    need(pulOperationStateLen, "pulOperationStateLen")
    vs = g.session(hSession)
    return g.run(vs, "C_GetOperationState",
                 lambda m: (pOperationState, pulOperationStateLen))[1]


def C_SetOperationState(g, hSession, pOperationState, ulOperationStateLen,
                        hEncryptionKey, hAuthenticationKey):
    need_buf(pOperationState, ulOperationStateLen, "pOperationState")
    vs = g.session(hSession)
    return g.run(vs, "C_SetOperationState", lambda m: (
        pOperationState, ulOperationStateLen, g.handle(hEncryptionKey, m),
        g.handle(hAuthenticationKey, m)))[1]


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
def read_template(p, count):
    """The application's template as (type, bytes or nested list) pairs."""
    p = mffi.cast(M_ATTR, p)
    items = []
    for i in range(count):
        a = p[i]
        if a.pValue == NULL or not a.ulValueLen:
            items.append((int(a.type), b""))
        elif a.type in TEMPLATE_ATTRS:
            items.append((int(a.type), read_template(a.pValue, a.ulValueLen // ATTR_SIZE)))
        else:
            items.append((int(a.type), bytes(mffi.buffer(a.pValue, a.ulValueLen))))
    return items


def C_CreateObject(g, hSession, pTemplate, ulCount, phObject):
    need(phObject, "phObject")
    t = tmpl(g, pTemplate, ulCount)
    vs = g.session(hSession)
    rv, vhs = g.replay_create(vs, "C_CreateObject", lambda m, o: (t, ulCount, o))
    if rv == OK:
        phObject[0] = vhs[0]
    return rv


def C_CopyObject(g, hSession, hObject, pTemplate, ulCount, phNewObject):
    need(phNewObject, "phNewObject")
    t = tmpl(g, pTemplate, ulCount)
    vs = g.session(hSession)
    rv, vhs = g.replay_create(vs, "C_CopyObject",
                              lambda m, o: (g.handle(hObject, m), t, ulCount, o))
    if rv == OK:
        phNewObject[0] = vhs[0]
        intent = g.replicator.intent(hObject)
        if intent is not None:              # a copy keeps what the application asked
            g.replicator.record_intent(vs, vhs[0], intent)
    return rv


def C_DestroyObject(g, hSession, hObject):
    vs = g.session(hSession)
    info = g.describe(hObject)
    rv = g.on_holders(vs, hObject, "C_DestroyObject", lambda m: ())
    if rv == OK:
        g.objects.forget(hObject)
        if vs.direct is None:
            g.replicator.destroyed(vs, info)
    return rv


def _reader(g, vs, vh):
    """A member holding ``vh`` for reading it: the primary when it does."""
    p = g.primary
    if g.holds(p, vh):
        return p
    return g.pick(vs, (vh,))


def C_GetObjectSize(g, hSession, hObject, pulSize):
    need(pulSize, "pulSize")
    vs = g.session(hSession)
    return g.run(vs, "C_GetObjectSize", lambda m: (g.handle(hObject, m), pulSize),
                 handles=(hObject,), member=_reader(g, vs, hObject))[1]


def C_GetAttributeValue(g, hSession, hObject, pTemplate, ulCount):
    t = tmpl(g, pTemplate, ulCount)
    vs = g.session(hSession)
    rv = g.run(vs, "C_GetAttributeValue", lambda m: (g.handle(hObject, m), t, ulCount),
               handles=(hObject,), member=_reader(g, vs, hObject))[1]
    intent = g.replicator.intent(hObject)
    if intent is not None and rv in (OK, CKR.ATTRIBUTE_SENSITIVE, CKR.ATTRIBUTE_TYPE_INVALID):
        report_intent(t, ulCount, intent)
    return rv


def report_intent(t, count, intent):
    """What the application asked for is what the HA slot reports."""
    values = {K.CKA_EXTRACTABLE: intent["extractable"],
              K.CKA_WRAP_WITH_TRUSTED: intent["wwt"],
              K.CKA_NEVER_EXTRACTABLE: not intent["extractable"]}
    for i in range(count):
        a = t[i]
        if a.type in values and a.pValue != NULL and a.ulValueLen >= 1:
            mffi.cast("CK_BBOOL *", a.pValue)[0] = 1 if values[a.type] else 0
            a.ulValueLen = 1


def C_SetAttributeValue(g, hSession, hObject, pTemplate, ulCount):
    t = tmpl(g, pTemplate, ulCount)
    vs = g.session(hSession)
    intent = g.replicator.intent(hObject)
    if intent is not None and not intent["extractable"]:
        for typ, value in read_template(pTemplate, ulCount):
            if typ == K.CKA_EXTRACTABLE and value not in (b"", b"\x00"):
                raise P11Error(CKR.ATTRIBUTE_READ_ONLY,
                               "a non-extractable key cannot become extractable")
    return g.on_holders(vs, hObject, "C_SetAttributeValue", lambda m: (t, ulCount))


def C_FindObjectsInit(g, hSession, pTemplate, ulCount):
    t = tmpl(g, pTemplate, ulCount)
    vs = g.session(hSession)
    if vs.find is not None:
        raise P11Error(CKR.OPERATION_ACTIVE, "a search is already active in this session")
    found, seen = [], set()
    batch = mffi.new("CK_OBJECT_HANDLE[]", 256)
    n = mffi.new("CK_ULONG *")
    first = True
    for m in g.targets(vs):
        try:
            ms = g.member_session(vs, m)
            rv = m.call("C_FindObjectsInit", ms, t, ulCount)
            if rv != OK:
                if first:
                    return rv
                continue
            handles = []
            while True:
                rv = m.call("C_FindObjects", ms, batch, 256, n)
                if rv != OK:
                    break
                handles += [int(batch[i]) for i in range(n[0])]
                if n[0] < 256:
                    break
            m.call("C_FindObjectsFinal", ms)
        except MemberDown:
            continue
        first = False
        claimed = set()
        for mh in handles:
            vh = g.map_found(m, mh, ms, claimed)
            if vh is not None and vh not in seen:
                seen.add(vh)
                found.append(vh)
    if first:
        raise P11Error(CKR.DEVICE_ERROR, "no member could run the search")
    vs.find = found
    return OK


def C_FindObjects(g, hSession, phObject, ulMaxObjectCount, pulObjectCount):
    need(pulObjectCount, "pulObjectCount")
    need_buf(phObject, ulMaxObjectCount, "phObject")
    vs = g.session(hSession)
    if vs.find is None:
        raise P11Error(NOT_INITIALIZED_OP, "C_FindObjects without C_FindObjectsInit")
    out, vs.find = vs.find[:ulMaxObjectCount], vs.find[ulMaxObjectCount:]
    for i, vh in enumerate(out):
        phObject[i] = vh
    pulObjectCount[0] = len(out)
    return OK


def C_FindObjectsFinal(g, hSession):
    vs = g.session(hSession)
    if vs.find is None:
        raise P11Error(NOT_INITIALIZED_OP, "C_FindObjectsFinal without C_FindObjectsInit")
    vs.find = None
    return OK


# ---- cryptographic operations, by shape (one handler per family) -------------------------
def op_init(kind, fname, with_key=True):
    def handler(g, hSession, pMechanism, hKey=None):
        need(pMechanism, "pMechanism")
        vs = g.session(hSession)
        vs.sync()
        if kind in vs.ops:
            raise P11Error(CKR.OPERATION_ACTIVE)
        recorded = Mechanism(pMechanism)
        direct = None if recorded.type in HANDLE_PARAMS else mffi.cast(M_MECH, pMechanism)
        return g.start_op(vs, kind, fname, recorded, hKey if with_key else None, direct)
    return handler


def _op(vs, kind):
    vs.sync()
    op = vs.ops.get(kind)
    if op is None:
        raise P11Error(NOT_INITIALIZED_OP)
    return op


def _run_op(g, vs, kind, fname, args, ends):
    """Run one call of an operation on its member. A single-part operation (or a
    multi-part one before its first part was taken) whose member fails is replayed
    on another member; after that, the failure ends it with CKR_DEVICE_ERROR."""
    op = _op(vs, kind)
    while True:
        m = op.member
        try:
            rv = m.call(fname, vs.members.get(m.name, 0), *args)
            break
        except MemberDown as e:
            if op.multipart:
                vs.end(kind)
                raise P11Error(CKR.DEVICE_ERROR, f"{e.reason}: the multi-part operation "
                               "ended with its member; start it again")
            op = g.replay_op(vs, kind, op)
    if ends(rv):
        vs.end(kind)
    return rv


def _ends_unless_length(p_out):
    return lambda rv: not (rv == BUFFER_TOO_SMALL or (rv == OK and p_out == NULL))


def op_single(kind, fname):
    """(in, out) single-part calls: the operation ends unless the call was a length
    query or answered CKR_BUFFER_TOO_SMALL."""
    def handler(g, hSession, pIn, ulInLen, pOut, pulOutLen):
        need_buf(pIn, ulInLen, "input")
        need(pulOutLen, "output length pointer")
        vs = g.session(hSession)
        return _run_op(g, vs, kind, fname, (pIn, ulInLen, pOut, pulOutLen),
                       _ends_unless_length(pOut))
    return handler


def op_final(kind, fname):
    def handler(g, hSession, pOut, pulOutLen):
        need(pulOutLen, "output length pointer")
        vs = g.session(hSession)
        return _run_op(g, vs, kind, fname, (pOut, pulOutLen), _ends_unless_length(pOut))
    return handler


def op_update(kinds, fname, with_output):
    """Multi-part updates: pinned to the member that took the first part."""
    def handler(g, hSession, pIn, ulInLen, *out):
        need_buf(pIn, ulInLen, "input")
        if with_output:
            need(out[1], "output length pointer")
        vs = g.session(hSession)
        vs.sync()
        if len(kinds) > 1 and not any(k in vs.ops for k in kinds):
            # no operation to combine: the member answers (often "not supported")
            return g.on_primary(vs, fname, lambda m: (pIn, ulInLen) + out)[1]
        for k in kinds[1:]:
            _op(vs, k)
        rv = _run_op(g, vs, kinds[0], fname, (pIn, ulInLen) + out,
                     lambda rv: rv != OK and rv != BUFFER_TOO_SMALL)
        for k in kinds:
            if rv == OK or rv == BUFFER_TOO_SMALL:
                vs.multipart(k)
            else:
                vs.end(k)
        return rv
    return handler


def op_verify(kind, fname, with_data):
    def handler(g, hSession, *args):
        if with_data:
            need_buf(args[0], args[1], "data")
        need_buf(args[-2], args[-1], "signature")
        vs = g.session(hSession)
        return _run_op(g, vs, kind, fname, args, lambda rv: True)
    return handler


def C_DigestKey(g, hSession, hKey):
    vs = g.session(hSession)
    op = _op(vs, "digest")
    rv = _run_op(g, vs, "digest", "C_DigestKey", (g.handle(hKey, op.member),),
                 lambda rv: rv != OK)
    vs.multipart("digest")
    return rv


# ---- key management ---------------------------------------------------------------
def _generate(g, vs, fname, p_mech, templates, out_count):
    """Key generation on the primary, then copies on every other member. Secret and
    private keys are generated so that they can travel under the domain key; the
    application's own wish is recorded and enforced as its intent."""
    # with a domain key the group replicates: even a group of one member today (a member
    # added later must be able to receive the key)
    replicate = vs.direct is None and g.primary.domain_key is not None
    intents = [None] * len(templates)
    built = []
    for i, (p, n, secret) in enumerate(templates):
        if replicate and secret:
            items, intents[i] = g.replicator.generation_template(read_template(p, n))
            arr, keep = c_template(items)
            built.append((arr, len(items), keep))
        else:
            built.append((tmpl(g, p, n), n, None))
    recorded = Mechanism(p_mech)
    out = mffi.new("CK_OBJECT_HANDLE[2]")

    def args(m):
        mech, keep = recorded.build(lambda vh: g.handle(vh, m))
        args._keep = keep
        flat = []
        for arr, n, _ in built:
            flat += [arr, n]
        return (mech, *flat, *(out + i for i in range(out_count)))
    p, rv = g.on_primary(vs, fname, args)
    if rv != OK:
        return rv, None
    vhs = [g.adopt(vs, p, out[i]) for i in range(out_count)]
    for i, vh in enumerate(vhs):
        if intents[i] is not None:
            g.replicator.record_intent(vs, vh, intents[i])
    if replicate:
        for i, vh in enumerate(vhs):
            g.replicator.replicate(vs, p, vh, out[i])
    return OK, vhs


def C_GenerateKey(g, hSession, pMechanism, pTemplate, ulCount, phKey):
    need(phKey, "phKey")
    need(pMechanism, "pMechanism")
    need_buf(pTemplate, ulCount, "template")
    vs = g.session(hSession)
    rv, vhs = _generate(g, vs, "C_GenerateKey", pMechanism, [(pTemplate, ulCount, True)], 1)
    if rv == OK:
        phKey[0] = vhs[0]
    return rv


def C_GenerateKeyPair(g, hSession, pMechanism, pPublicKeyTemplate, ulPublicKeyAttributeCount,
                      pPrivateKeyTemplate, ulPrivateKeyAttributeCount, phPublicKey,
                      phPrivateKey):
    need(phPublicKey, "phPublicKey")
    need(phPrivateKey, "phPrivateKey")
    need(pMechanism, "pMechanism")
    need_buf(pPublicKeyTemplate, ulPublicKeyAttributeCount, "public key template")
    need_buf(pPrivateKeyTemplate, ulPrivateKeyAttributeCount, "private key template")
    vs = g.session(hSession)
    rv, vhs = _generate(g, vs, "C_GenerateKeyPair", pMechanism,
                        [(pPublicKeyTemplate, ulPublicKeyAttributeCount, False),
                         (pPrivateKeyTemplate, ulPrivateKeyAttributeCount, True)], 2)
    if rv == OK:
        phPublicKey[0], phPrivateKey[0] = vhs
    return rv


def C_WrapKey(g, hSession, pMechanism, hWrappingKey, hKey, pWrappedKey, pulWrappedKeyLen):
    need(pulWrappedKeyLen, "pulWrappedKeyLen")
    need(pMechanism, "pMechanism")
    vs = g.session(hSession)
    intent = g.replicator.intent(hKey)
    if intent is not None and not intent["extractable"]:
        raise P11Error(CKR.KEY_UNEXTRACTABLE, "the key was created non-extractable")
    recorded = Mechanism(pMechanism)
    return g.run(vs, "C_WrapKey", lambda m: (
        recorded.build(lambda vh: g.handle(vh, m))[0], g.handle(hWrappingKey, m),
        g.handle(hKey, m), pWrappedKey, pulWrappedKeyLen), handles=(hWrappingKey, hKey))[1]


def C_UnwrapKey(g, hSession, pMechanism, hUnwrappingKey, pWrappedKey, ulWrappedKeyLen,
                pTemplate, ulAttributeCount, phKey):
    need(phKey, "phKey")
    need(pMechanism, "pMechanism")
    need_buf(pWrappedKey, ulWrappedKeyLen, "pWrappedKey")
    t = tmpl(g, pTemplate, ulAttributeCount)
    vs = g.session(hSession)
    recorded = Mechanism(pMechanism)
    rv, vhs = g.replay_create(vs, "C_UnwrapKey", lambda m, o: (
        recorded.build(lambda vh: g.handle(vh, m))[0], g.handle(hUnwrappingKey, m),
        pWrappedKey, ulWrappedKeyLen, t, ulAttributeCount, o))
    if rv == OK:
        phKey[0] = vhs[0]
    return rv


def C_DeriveKey(g, hSession, pMechanism, hBaseKey, pTemplate, ulAttributeCount, phKey):
    need(phKey, "phKey")
    need(pMechanism, "pMechanism")
    t = tmpl(g, pTemplate, ulAttributeCount)
    vs = g.session(hSession)
    recorded = Mechanism(pMechanism)
    rv, vhs = g.replay_create(vs, "C_DeriveKey", lambda m, o: (
        recorded.build(lambda vh: g.handle(vh, m))[0], g.handle(hBaseKey, m), t,
        ulAttributeCount, o))
    if rv == OK:
        phKey[0] = vhs[0]
    return rv


# ---- random, legacy, events ------------------------------------------------------------
def C_SeedRandom(g, hSession, pSeed, ulSeedLen):
    need_buf(pSeed, ulSeedLen, "pSeed")
    return g.run(g.session(hSession), "C_SeedRandom", lambda m: (pSeed, ulSeedLen))[1]


def C_GenerateRandom(g, hSession, RandomData, ulRandomLen):
    need_buf(RandomData, ulRandomLen, "RandomData")
    return g.run(g.session(hSession), "C_GenerateRandom",
                 lambda m: (RandomData, ulRandomLen))[1]


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
NO_ENGINE_NEEDED = {"C_Initialize"}


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
    native.attach(ffi, lib)
    for f in FUNCTIONS_V3:
        if f.name in IN_C:
            continue
        ffi.def_extern(name="py_" + f.name, error=CKR.GENERAL_ERROR)(
            _entry(f.name, HANDLERS.get(f.name, not_supported)))
    ffi.def_extern(name="py_hashim_hello", error=0)(lambda: MAGIC)
    os.register_at_fork(after_in_child=_after_fork_in_child)
