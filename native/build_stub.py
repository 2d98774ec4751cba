"""Build the hashim PKCS#11 module: a thin C stub, made with cffi *embedding*.

Everything is generated from shim/spec/functions.py:
  * one exported wrapper per PKCS#11 function (``C_Sign`` ...), which checks that the
    embedded Python engine started and hands the call to its ``py_C_Sign`` handler;
  * the CK_FUNCTION_LIST (v2.40) and CK_FUNCTION_LIST_3_0 tables and the two
    CK_INTERFACEs, answered in C (C_GetFunctionList / C_GetInterfaceList /
    C_GetInterface never need Python).

Guards (see ../shared/TRAPS.md): libpython is re-opened RTLD_GLOBAL from a
constructor; a C host gets an isolated interpreter with the home and site-packages
baked in here; a failed start answers CKR_GENERAL_ERROR (one message), never CKR_OK.
"""
from __future__ import annotations

import os
import sys
import sysconfig

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from shim.spec.cdef import cdef, TYPES, function_lists  # noqa: E402
from shim.spec.functions import FUNCTIONS_V2, FUNCTIONS_V3, IN_C  # noqa: E402
from shim.spec.fastpath import (FAST, INIT_FAST, INIT_PARAM_MAX, KINDS, ENDED, MULTIPART)
from shim.spec.failures import DEVICE_LEVEL  # noqa: E402

HANDLED_IN_PYTHON = [f for f in FUNCTIONS_V3 if f.name not in IN_C]
MAGIC = 0x6A5F1
CKR_GENERAL_ERROR = 0x5
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190


def c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def baked_paths() -> dict[str, str]:
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    sites = []
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths()[key]
        if p not in sites:
            sites.append(p)
    return {
        "HASHIM_PY_HOME": sys.base_prefix,
        "HASHIM_PY_SITES": os.pathsep.join(sites),
        "HASHIM_LIBPYTHON": os.path.join(libdir, soname),
    }


def c_source() -> str:
    SUPERVISE_C = open(os.path.join(HERE, "supervise.c")).read()
    FASTPATH_C = (f"#define HASHIM_KINDS {len(KINDS)}\n"
                  f"#define HASHIM_INIT_PARAM_MAX {INIT_PARAM_MAX}\n"
                  "static inline int hashim_device_level(CK_RV rv)\n{\n    return "
                  + " || ".join(f"rv == {int(c):#x}" for c in sorted(DEVICE_LEVEL))
                  + ";\n}\n" + open(os.path.join(HERE, "fastpath.c")).read())
    paths = baked_paths()
    defines = "".join(f"#define {k} {c_string(v)}\n" for k, v in paths.items())
    wrappers = [SESSION_INFO_C if f.name == "C_GetSessionInfo" else
                fast_wrapper(f) if f.name in FAST else
                init_wrapper(f) if f.name in INIT_FAST else
                f"CK_RV {f.name}({f.c_params})\n{{\n"
                f"    if (!hashim_ready()) return hashim_down_rv;\n"
                f"    return py_{f.name}({f.arg_names});\n}}\n"
                for f in HANDLED_IN_PYTHON]
    v2 = ",\n".join(f"    .{f.name} = {f.name}" for f in FUNCTIONS_V2)
    v3 = ",\n".join(f"    .{f.name} = {f.name}" for f in FUNCTIONS_V3)
    return f"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>
#include <time.h>
{defines}
#define HASHIM_MAGIC {MAGIC}
{TYPES}
{function_lists()}
#define HASHIM_EXPORT __attribute__((visibility("default")))
/* the Python handlers (cffi defines them further down) */
static int py_hashim_hello(void);
{"".join(f"static CK_RV py_{f.name}({f.c_params});" + chr(10) for f in HANDLED_IN_PYTHON)}
/* ---- start-up of the embedded engine ------------------------------------- */
static pthread_once_t hashim_once = PTHREAD_ONCE_INIT;
static volatile int hashim_up = 0;          /* 1 started, -1 failed */
static CK_RV hashim_down_rv = {CKR_GENERAL_ERROR};
static int hashim_owns_python = 0;
static PyGILState_STATE hashim_fork_gil;

__attribute__((constructor)) static void hashim_make_libpython_global(void)
{{
    /* A C host dlopen()s us RTLD_LOCAL: make libpython's symbols visible to the
       extension modules the interpreter will import (_cffi_backend ...). */
    if (!dlopen(HASHIM_LIBPYTHON, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL))
        dlopen(HASHIM_LIBPYTHON, RTLD_NOW | RTLD_GLOBAL);
}}

static void hashim_before_fork(void)
{{
    hashim_fork_gil = PyGILState_Ensure();
    PyOS_BeforeFork();
}}
static void hashim_after_fork_parent(void)
{{
    PyOS_AfterFork_Parent();
    PyGILState_Release(hashim_fork_gil);
}}
static void hashim_after_fork_child(void)
{{
    /* runs os.register_at_fork(after_in_child=...) hooks: the engine forgets the
       parent's members and sessions; the child must call C_Initialize again */
    PyOS_AfterFork_Child();
    PyGILState_Release(hashim_fork_gil);
}}

static int hashim_start_python(void)
{{
    if (Py_IsInitialized())
        return 0;                       /* a Python host: use its interpreter */
    PyConfig config;
    PyStatus st;
    PyConfig_InitIsolatedConfig(&config);
    st = PyConfig_SetBytesString(&config, &config.home, HASHIM_PY_HOME);
    if (!PyStatus_Exception(st))
        st = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(st)) {{
        fprintf(stderr, "hashim: cannot start Python (home %s): %s\\n", HASHIM_PY_HOME,
                st.err_msg ? st.err_msg : "unknown error");
        return -1;
    }}
    PyEval_SaveThread();                /* release the GIL for every thread */
    hashim_owns_python = 1;
    pthread_atfork(hashim_before_fork, hashim_after_fork_parent, hashim_after_fork_child);
    return 0;
}}

static void hashim_start(void)
{{
    if (hashim_start_python() == 0 && cffi_start_python() == 0
            && py_hashim_hello() == HASHIM_MAGIC) {{
        hashim_up = 1;
        return;
    }}
    hashim_up = -1;
    fprintf(stderr, "hashim: the embedded Python engine failed to start (see the message "
            "above); every PKCS#11 call will return CKR_GENERAL_ERROR. Check that the "
            "Python at %s has the hashim package and cffi installed.\\n", HASHIM_PY_HOME);
}}

static inline int hashim_ready(void)
{{
    if (__builtin_expect(hashim_up == 1, 1))
        return 1;
    pthread_once(&hashim_once, hashim_start);
    return hashim_up == 1;
}}

/* Path of this module file (the engine finds its package next to it). */
static const char *hashim_module_file(void)
{{
    static Dl_info info;
    if (dladdr((void *)hashim_module_file, &info) && info.dli_fname)
        return info.dli_fname;
    return "";
}}
static const char *hashim_py_sites(void) {{ return HASHIM_PY_SITES; }}


{SUPERVISE_C}
{FASTPATH_C}
/* ---- the function lists and interfaces --------------------------------- */
{"".join(f"HASHIM_EXPORT CK_RV {f.name}({f.c_params});" + chr(10) for f in FUNCTIONS_V3)}
static CK_FUNCTION_LIST hashim_functions = {{
    .version = {{2, 40}},
{v2}
}};
static CK_FUNCTION_LIST_3_0 hashim_functions_3_0 = {{
    .version = {{3, 0}},
{v3}
}};
static CK_INTERFACE hashim_interfaces[2] = {{
    {{ (CK_CHAR *)"PKCS 11", &hashim_functions_3_0, 0 }},
    {{ (CK_CHAR *)"PKCS 11", &hashim_functions, 0 }},
}};
#define HASHIM_N_INTERFACES 2

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList)
{{
    if (!ppFunctionList) return 7; /* CKR_ARGUMENTS_BAD */
    *ppFunctionList = &hashim_functions;
    return 0;
}}

CK_RV C_GetInterfaceList(CK_INTERFACE_PTR pInterfacesList, CK_ULONG_PTR pulCount)
{{
    if (!pulCount) return 7;
    if (!pInterfacesList) {{ *pulCount = HASHIM_N_INTERFACES; return 0; }}
    if (*pulCount < HASHIM_N_INTERFACES) {{
        *pulCount = HASHIM_N_INTERFACES;
        return 0x150; /* CKR_BUFFER_TOO_SMALL */
    }}
    memcpy(pInterfacesList, hashim_interfaces, sizeof(hashim_interfaces));
    *pulCount = HASHIM_N_INTERFACES;
    return 0;
}}

CK_RV C_GetInterface(CK_UTF8CHAR_PTR pInterfaceName, CK_VERSION_PTR pVersion,
                     CK_INTERFACE_PTR_PTR ppInterface, CK_FLAGS flags)
{{
    int i;
    if (!ppInterface) return 7;
    if (pInterfaceName && strcmp((const char *)pInterfaceName, "PKCS 11") != 0)
        return 7;
    for (i = 0; i < HASHIM_N_INTERFACES; i++) {{
        CK_VERSION *v = (CK_VERSION *)hashim_interfaces[i].pFunctionList;
        if (pVersion && (pVersion->major != v->major || pVersion->minor != v->minor))
            continue;
        if ((hashim_interfaces[i].flags & flags) != flags)
            continue;
        *ppInterface = &hashim_interfaces[i];
        return 0;
    }}
    return 7;
}}

/* ---- generated wrappers: every other call goes to the Python engine ----- */
{"".join(wrappers)}
"""


def fast_wrapper(f) -> str:
    """A wrapper that calls the member directly when the engine published a route
    (see shim/spec/fastpath.py); anything else goes to Python."""
    kind, shape = FAST[f.name]
    names = [n for _, n in f.args]
    k = KINDS.index(kind)
    member_args = ", ".join(["r.mh"] + names[1:])
    if shape in ("single", "update_out"):
        checks = f"{names[4]} && ({names[1]} || !{names[2]})"
    elif shape in ("update", "random"):
        checks = f"({names[1]} || !{names[2]})"
    elif shape == "final":
        checks = f"{names[2]}"
    elif shape == "verify":
        checks = f"({names[1]} || !{names[2]}) && ({names[3]} || !{names[4]})"
    else:                                       # verify_final
        checks = f"({names[1]} || !{names[2]})"
    if shape in ("single", "final"):
        out = names[3] if shape == "single" else names[1]
        after = (f"if (!(rv == 0x150 || (rv == 0 && !{out})))\n"
                 f"                hashim_route_mark({names[0]}, {k}, {ENDED});")
    elif shape in ("update", "update_out"):
        after = (f"if (rv == 0 || rv == 0x150) {{ if (r.state != {MULTIPART}) "
                 f"hashim_route_mark({names[0]}, {k}, {MULTIPART}); }}\n"
                 f"            else hashim_route_mark({names[0]}, {k}, {ENDED});")
    elif shape in ("verify", "verify_final"):
        after = f"hashim_route_mark({names[0]}, {k}, {ENDED});"
    else:
        after = ""
    get = "hashim_route_pick" if shape == "random" else "hashim_route_get"
    return (f"CK_RV {f.name}({f.c_params})\n{{\n"
            f"    struct hashim_route r;\n"
            f"    if (!hashim_ready()) return hashim_down_rv;\n"
            f"    if ({checks} && {get}({names[0]}, {k}, &r)) {{\n"
            f"        hashim_fast_begin(&r);\n"
            f"        CK_RV rv = r.fl->{f.name}({member_args});\n"
            f"        hashim_fast_end(&r);\n"
            f"        if (!hashim_device_level(rv)) {{\n"
            f"            {after}\n"
            f"            return rv;\n"
            f"        }}\n"
            f"    }}\n"
            f"    return py_{f.name}({f.arg_names});\n}}\n")


SESSION_INFO_C = """CK_RV C_GetSessionInfo(CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo)
{
    if (!hashim_ready()) return hashim_down_rv;
    if (hashim_session_info(hSession, pInfo)) return 0;
    return py_C_GetSessionInfo(hSession, pInfo);
}
"""


def init_wrapper(f) -> str:
    """*Init: started again by the stub when it repeats the operation that just ended
    in the fast path (see INIT_FAST); anything else goes to Python."""
    k = KINDS.index(INIT_FAST[f.name])
    names = [n for _, n in f.args]
    key = names[2] if len(names) > 2 else "0"
    member_args = ", ".join(["r.mh", names[1]] + (["r.mkey"] if len(names) > 2 else []))
    return (f"CK_RV {f.name}({f.c_params})\n{{\n"
            f"    struct hashim_route r;\n"
            f"    if (!hashim_ready()) return hashim_down_rv;\n"
            f"    if (hashim_reinit_get({names[0]}, {k}, {names[1]}, {key}, &r)) {{\n"
            f"        hashim_fast_begin(&r);\n"
            f"        CK_RV rv = r.fl->{f.name}({member_args});\n"
            f"        hashim_fast_end(&r);\n"
            f"        if (rv == 0) {{\n"
            f"            hashim_route_rebind({names[0]}, {k}, &r);\n"
            f"            return rv;\n"
            f"        }}\n"
            f"        if (!hashim_device_level(rv))\n"
            f"            return rv;\n"
            f"    }}\n"
            f"    return py_{f.name}({f.arg_names});\n}}\n")


def python_cdef() -> str:
    lines = [cdef()]
    lines.append('extern "Python" int py_hashim_hello(void);')
    for f in HANDLED_IN_PYTHON:
        lines.append(f'extern "Python" CK_RV py_{f.name}({f.c_params});')
    lines.append("const char *hashim_module_file(void);")
    lines.append("const char *hashim_py_sites(void);")
    lines.append("int hashim_call(void *fn, CK_ULONG *args, double seconds, CK_RV *rv, void **job);")
    lines.append("int hashim_wait(void *job, double seconds, CK_RV *rv);")
    lines.append("void hashim_abandon(void *job);")
    lines.append("int hashim_pool_size(void);")
    lines.append("int hashim_route_claim(CK_SESSION_HANDLE vh);")
    lines.append("void hashim_route_release(CK_SESSION_HANDLE vh);")
    lines.append("void hashim_route_set(CK_SESSION_HANDLE vh, int kind, void *fl, "
                 "CK_SESSION_HANDLE mh, int member);")
    lines.append("int hashim_route_state(CK_SESSION_HANDLE vh, int kind);")
    lines.append("void hashim_route_end(CK_SESSION_HANDLE vh, int kind);")
    lines.append("void hashim_route_multipart(CK_SESSION_HANDLE vh, int kind);")
    lines.append("void hashim_route_alternatives(CK_SESSION_HANDLE vh, int kind, int n, "
                 "int *members, void **fls, CK_SESSION_HANDLE *mhs, CK_OBJECT_HANDLE *mkeys);")
    lines.append("int hashim_route_member(CK_SESSION_HANDLE vh, int kind);")
    lines.append("void hashim_routes_expire(void);")
    lines.append("void hashim_session_publish(CK_SESSION_HANDLE vh, CK_FLAGS flags, "
                 "CK_SLOT_ID slot);")
    lines.append("void hashim_login_publish(int user);")
    lines.append("void hashim_member_set_up(int member, int up);")
    lines.append("void hashim_member_stats(int member, long *inflight, unsigned long *served, "
                 "long long *idle_ns);")
    lines.append("void hashim_routes_reset(void);")
    lines.append("long hashim_member_inflight(int member);")
    lines.append("void hashim_route_set_init(CK_SESSION_HANDLE vh, int kind, "
                 "CK_MECHANISM_TYPE mech, const unsigned char *param, CK_ULONG plen, "
                 "CK_OBJECT_HANDLE vkey, CK_OBJECT_HANDLE mkey);")
    return "\n".join(lines)


INIT_CODE = r'''
import os, sys, site
from _hashim_stub import ffi, lib
_here = os.path.dirname(os.path.dirname(os.path.realpath(ffi.string(lib.hashim_module_file()).decode())))
for _site in ffi.string(lib.hashim_py_sites()).decode().split(os.pathsep):
    if _site and _site not in sys.path:
        site.addsitedir(_site)
if "shim" not in sys.modules and os.path.isfile(os.path.join(_here, "shim", "__init__.py")):
    # the package next to this module file, whatever else the path would find first
    import importlib.util
    _spec = importlib.util.spec_from_file_location(
        "shim", os.path.join(_here, "shim", "__init__.py"),
        submodule_search_locations=[os.path.join(_here, "shim")])
    _pkg = importlib.util.module_from_spec(_spec)
    sys.modules["shim"] = _pkg
    _spec.loader.exec_module(_pkg)
from shim import frontend
frontend.install(ffi, lib)
'''


def make_builder() -> cffi.FFI:
    ffib = cffi.FFI()
    ffib.embedding_api("")
    ffib.cdef(python_cdef())
    ffib.embedding_init_code(INIT_CODE)
    libdir = sysconfig.get_config_var("LIBDIR")
    ffib.set_source("_hashim_stub", c_source(),
                    extra_compile_args=["-O2", "-fvisibility=hidden", "-Wno-unused-function"],
                    extra_link_args=["-pthread", "-ldl", f"-Wl,-rpath,{libdir}",
                                     "-Wl,-Bsymbolic"])
    return ffib


ffibuilder = make_builder()

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(HERE), "shim")
    tmp = os.path.join(HERE, "build")
    so = ffibuilder.compile(tmpdir=tmp, target="libhashim.so", verbose=False)
    os.replace(so, os.path.join(out, "libhashim.so"))
    print(os.path.join(out, "libhashim.so"))
