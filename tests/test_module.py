"""The module as a whole, through the real .so: start-up guard, configuration errors,
v3.0 interfaces, slot events, fork, and secrets kept out of logs and output."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_hashim_env, require_hashim
from tests import softhsm
from tests.clients import base_env, result, run_py

SNIPPET_HEAD = """
import ctypes, os, sys
from ctypes import byref, c_ulong
from tests.clients import P11, K, emit, buf, ulong
p = P11(os.environ["HASHIM_MODULE"])
"""


def run_snippet(env, code, **kw):
    return result(run_py(SNIPPET_HEAD + code, env, **kw))


def test_module_path_command():
    out = subprocess.run(["hashim", "module-path"], capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    assert os.path.isabs(path) and os.path.isfile(path) and path == require_hashim()


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3.11"), reason="no second Python")
def test_failed_embedded_start_never_answers_ok(tmp_path, token):
    """A host running another Python build (Debian's, without our cffi) cannot start
    the engine: every call answers CKR_GENERAL_ERROR and the reason is printed once."""
    env = make_hashim_env(tmp_path, [token])
    script = tmp_path / "host.py"
    script.write_text(
        "import ctypes, sys\n"
        "lib = ctypes.CDLL(sys.argv[1])\n"
        "fl = ctypes.c_void_p()\n"
        "print('C_GetFunctionList', lib.C_GetFunctionList(ctypes.byref(fl)))\n"
        "n = ctypes.c_ulong()\n"
        "for i in range(3):\n"
        "    print('C_Initialize', lib.C_Initialize(None))\n"
        "print('C_GetSlotList', lib.C_GetSlotList(1, None, ctypes.byref(n)))\n"
        "print('C_Finalize', lib.C_Finalize(None))\n")
    p = subprocess.run(["/usr/bin/python3.11", "-I", str(script), env["HASHIM_MODULE"]],
                       env=env, capture_output=True, text=True, timeout=60)
    lines = p.stdout.split("\n")
    assert lines[0] == "C_GetFunctionList 0"
    assert [line for line in lines[1:] if line] == ["C_Initialize 5"] * 3 + \
        ["C_GetSlotList 5", "C_Finalize 5"]
    assert p.stderr.count("the embedded Python engine failed to start") == 1


@pytest.mark.parametrize("case", ["missing file", "unknown key", "not a module",
                                  "token not found"])
def test_configuration_errors_fail_initialize(tmp_path, token, case):
    env = make_hashim_env(tmp_path, [token])
    conf = Path(env["HASHIM_CONF"])
    text = conf.read_text()
    expect_rv, expect_text = "CKR_GENERAL_ERROR", str(conf)
    if case == "missing file":
        conf.unlink()
        expect_text = "not found"
    elif case == "unknown key":
        conf.write_text(text.replace("[group]", "[group]\ncomand_timeout = 3"))
        expect_text = "command_timeout"
    elif case == "not a module":
        bogus = tmp_path / "libbogus.so"
        bogus.write_bytes(b"not an ELF file")
        conf.write_text(text.replace(token.lib, str(bogus)))
        expect_text = "libbogus.so"
    else:
        conf.write_text(text.replace(f'token_label = "{token.label}"',
                                     'token_label = "no-such-token"'))
        expect_rv, expect_text = "CKR_FUNCTION_FAILED", "no-such-token"
    p = subprocess.run([sys.executable, "-c", SNIPPET_HEAD + """
from tests.clients import rv_name
print(rv_name(p.initialize()))
"""], env=dict(env, PYTHONPATH=str(Path(__file__).parent.parent)), capture_output=True,
        text=True, timeout=60)
    assert p.stdout.strip() == expect_rv, p.stderr
    hashim_lines = [line for line in p.stderr.splitlines() if line.startswith("hashim:")]
    assert hashim_lines and expect_text in hashim_lines[-1], p.stderr


def test_interfaces_and_unsupported_v3_functions(tmp_path, token):
    env = make_hashim_env(tmp_path, [token])
    out = run_snippet(env, """
from tests.clients import rv_name
dll = p.dll
class CK_INTERFACE(ctypes.Structure):
    _fields_ = [("pInterfaceName", ctypes.c_char_p), ("pFunctionList", ctypes.c_void_p),
                ("flags", c_ulong)]
n = ulong()
res = {"count_query": rv_name(dll.C_GetInterfaceList(None, byref(n))), "count": n.value}
small = ulong(1)
arr = (CK_INTERFACE * 2)()
res["small"] = rv_name(dll.C_GetInterfaceList(arr, byref(small)))
res["small_count"] = small.value
res["list"] = rv_name(dll.C_GetInterfaceList(arr, byref(n)))
res["names"] = [arr[i].pInterfaceName.decode() for i in range(n.value)]
versions = []
for i in range(n.value):
    v = ctypes.cast(arr[i].pFunctionList, ctypes.POINTER(ctypes.c_ubyte * 2)).contents
    versions.append([v[0], v[1]])
res["versions"] = versions
pi = ctypes.c_void_p()
res["default"] = rv_name(dll.C_GetInterface(None, None, byref(pi), 0))
res["bad_name"] = rv_name(dll.C_GetInterface(b"Vendor X", None, byref(pi), 0))
res["null_out"] = rv_name(dll.C_GetInterface(None, None, None, 0))
# v3.0 functions the engine does not implement
fl30 = ctypes.cast(arr[0].pFunctionList, ctypes.POINTER(ctypes.c_void_p * 93)).contents
p.initialize()
CK = ctypes.CFUNCTYPE(c_ulong, c_ulong)
# C_MessageEncryptFinal(hSession) is entry 1 + 68 + 8 (version word + 68 + 8 before it)
res["msg_final"] = rv_name(CK(fl30[1 + 68 + 8])(1))
res["session_cancel"] = rv_name(ctypes.CFUNCTYPE(c_ulong, c_ulong, c_ulong)(fl30[1 + 68 + 3])(1, 0))
emit(res)
""")
    assert out["count_query"] == "CKR_OK" and out["count"] == 2
    assert out["small"] == "CKR_BUFFER_TOO_SMALL" and out["small_count"] == 2
    assert out["list"] == "CKR_OK" and out["names"] == ["PKCS 11", "PKCS 11"]
    assert out["versions"] == [[3, 0], [2, 40]]
    assert out["default"] == "CKR_OK"
    assert out["bad_name"] == "CKR_ARGUMENTS_BAD" and out["null_out"] == "CKR_ARGUMENTS_BAD"
    assert out["msg_final"] == "CKR_FUNCTION_NOT_SUPPORTED"
    assert out["session_cancel"] == "CKR_FUNCTION_NOT_SUPPORTED"


def test_wait_for_slot_event(tmp_path, token):
    env = make_hashim_env(tmp_path, [token])
    out = run_snippet(env, """
import threading, time
from tests.clients import rv_name
p.initialize()
slot = ulong()
res = {"dont_block": rv_name(p.C_WaitForSlotEvent(K.CKF_DONT_BLOCK, byref(slot), None)),
       "null_slot": rv_name(p.C_WaitForSlotEvent(K.CKF_DONT_BLOCK, None, None))}
got = {}
def waiter():
    got["rv"] = rv_name(p.C_WaitForSlotEvent(0, byref(slot), None))
t = threading.Thread(target=waiter)
t.start()
time.sleep(0.5)
res["still_waiting"] = t.is_alive()
res["finalize"] = rv_name(p.C_Finalize(None))
t.join(10)
res["woken"] = got.get("rv")
emit(res)
""")
    assert out == {"dont_block": "CKR_NO_EVENT", "null_slot": "CKR_ARGUMENTS_BAD",
                   "still_waiting": True, "finalize": "CKR_OK",
                   "woken": "CKR_CRYPTOKI_NOT_INITIALIZED"}


def test_forked_child_must_initialize_again(tmp_path, token):
    env = make_hashim_env(tmp_path, [token])
    out = run_snippet(env, """
import json
from tests.clients import rv_name
p.initialize()
rv, slots = p.slot_list()
s = ulong()
p.C_OpenSession(slots[0], K.CKF_SERIAL_SESSION, None, None, byref(s))
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    child = {"old_session": rv_name(p.C_GenerateRandom(s, buf(8), 8)),
             "slot_list": rv_name(p.C_GetSlotList(1, None, byref(ulong())))}
    child["init"] = rv_name(p.initialize())
    s2 = ulong()
    child["open"] = rv_name(p.C_OpenSession(slots[0], K.CKF_SERIAL_SESSION, None, None, byref(s2)))
    child["random"] = rv_name(p.C_GenerateRandom(s2, buf(8), 8))
    child["finalize"] = rv_name(p.C_Finalize(None))
    os.write(w, json.dumps(child).encode())
    os._exit(0)
os.close(w)
child = json.loads(os.read(r, 4096))
os.waitpid(pid, 0)
emit({"child": child, "parent": rv_name(p.C_GenerateRandom(s, buf(8), 8))})
""")
    assert out["child"] == {"old_session": "CKR_CRYPTOKI_NOT_INITIALIZED",
                            "slot_list": "CKR_CRYPTOKI_NOT_INITIALIZED", "init": "CKR_OK",
                            "open": "CKR_OK", "random": "CKR_OK", "finalize": "CKR_OK"}
    assert out["parent"] == "CKR_OK"


def test_pins_never_reach_logs_or_output(tmp_path):
    pin, so_pin = "97531864", "86420975"
    toks = [softhsm.make_token(tmp_path / "t", f"m{i}", pin=pin, so_pin=so_pin)
            for i in range(2)]
    env = make_hashim_env(tmp_path, toks)
    env["HASHIM_STDERR_LEVEL"] = "DEBUG"
    conf = env["HASHIM_CONF"]
    d = subprocess.run(["hashim", "--config", conf, "domain", "init"],
                       env=dict(env, HASHIM_SO_PIN=so_pin), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    assert d.returncode == 0, d.stderr
    code = SNIPPET_HEAD + f"""
from tests.clients import rv_name
p.initialize()
rv, slots = p.slot_list()
s = ulong()
p.C_OpenSession(slots[0], K.CKF_SERIAL_SESSION | K.CKF_RW_SESSION, None, None, byref(s))
print(rv_name(p.C_Login(s, K.CKU_USER, b"{pin}0", 9)))
print(rv_name(p.C_Login(s, K.CKU_USER, b"{pin}", 8)))
print(rv_name(p.C_SetPIN(s, b"{pin}", 8, b"{pin}", 8)))
print(rv_name(p.C_Logout(s)))
p.C_Finalize(None)
"""
    r = subprocess.run([sys.executable, "-c", code],
                       env=dict(env, PYTHONPATH=str(Path(__file__).parent.parent)),
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["CKR_PIN_INCORRECT", "CKR_OK", "CKR_OK", "CKR_OK"], r.stderr
    status_dir = [str(p) for p in Path(tmp_path).rglob("status-*.json")]
    everything = r.stdout + r.stderr + d.stdout + d.stderr + \
        Path(tmp_path / "hashim-ha.log").read_text() + \
        "".join(Path(f).read_text() for f in status_dir)
    assert pin not in everything and so_pin not in everything
