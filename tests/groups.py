"""Multi-member hashim groups for tests and benchmarks: N fresh SoftHSM2 tokens (each
with its own softhsm2.conf and private copy of libsofthsm2.so), optionally each behind
its own copy of the emulated HSM (tests/fixtures/emuhsm.c), the group's domain key
(``hashim domain init``) and a hashim.toml, plus ways to look at each member token
DIRECTLY (its own SoftHSM2 library and SOFTHSM2_CONF, not through hashim).

    from tests.groups import make_group
    g = make_group(tmp_path, ["a", "b", "c"])                # SoftHSM2 members
    g = make_group(tmp_path, 3, emu=True, control={"service_ms": 5})
    out = g.run_py(CODE, args)           # a client snippet through the HA slot
    g.members[1].objects()               # what member b's token holds, read directly
    g.members[0].stats(pid)              # emuhsm per-member counters of process pid
    g.log_text()                         # the HA log

Everything a member needs is under ``base/<member name>/``; the config, the HA log and
hashim's state directory are under ``base/``. Shared by tests/ and bench/.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tests import softhsm
from tests.clients import REPO, base_env, result, run_py

# Everything a direct look at a token reports per object (attribute names as in
# PyKCS11.constants, without the CKA_ prefix; absent/sensitive ones are left out).
OBJECT_ATTRS = ("CLASS", "KEY_TYPE", "LABEL", "ID", "TOKEN", "PRIVATE", "SENSITIVE",
                "EXTRACTABLE", "NEVER_EXTRACTABLE", "WRAP_WITH_TRUSTED", "SIGN", "VERIFY",
                "ENCRYPT", "DECRYPT", "WRAP", "UNWRAP", "DERIVE", "MODIFIABLE", "TRUSTED",
                "EC_PARAMS", "EC_POINT", "MODULUS", "PUBLIC_EXPONENT", "VALUE_LEN",
                "CHECK_VALUE", "APPLICATION", "VALUE")


@dataclass
class GroupMember:
    name: str
    token: softhsm.Token
    module: str                     # what hashim loads for this member
    env: dict[str, str]             # the member's env = { ... } in the config
    control: Path | None = None     # emuhsm control file (emu members)
    stats_pattern: str | None = None  # emuhsm stats file, "{pid}" = the process id

    @property
    def emu(self) -> bool:
        return self.control is not None

    @property
    def label(self) -> str:
        return self.token.label

    # -- the member token, directly ---------------------------------------------------
    @property
    def direct_env(self) -> dict[str, str]:
        """Environment for opening this member's token with its own SoftHSM2 library."""
        return base_env(SOFTHSM2_CONF=str(self.token.conf))

    @property
    def direct_lib(self) -> str:
        return self.token.lib

    def run_direct(self, code: str, args: Any = None, timeout: float = 60) -> Any:
        """Run ``code`` in a subprocess with ``LIB``, ``LABEL`` and ``PIN`` bound to this
        member's own SoftHSM2 library, token label and user PIN; returns what it
        ``emit``s."""
        prelude = ("from tests.clients import emit, P11, Template, K, ulong\n"
                   f"LIB, LABEL, PIN = {self.direct_lib!r}, {self.label!r}, "
                   f"{self.token.pin!r}\n")
        return result(run_py(prelude + code, self.direct_env, args, timeout=timeout))

    def objects(self, **match) -> list[dict]:
        """The token's objects (logged in as the user), read directly: one dict per
        object with the OBJECT_ATTRS the token reveals (CK_BBOOL -> bool, CK_ULONG ->
        int, CKA_LABEL -> str, byte strings -> hex). ``match`` filters by those keys,
        e.g. ``objects(LABEL="k1", CLASS=K.CKO_PRIVATE_KEY)``."""
        objs = self.run_direct(_LIST_OBJECTS, {"attrs": OBJECT_ATTRS})
        return [o for o in objs if all(o.get(k) == v for k, v in match.items())]

    # -- emuhsm -------------------------------------------------------------------------
    def set_control(self, **keys) -> None:
        from tests.fixtures.build import write_control
        assert self.control is not None, f"member {self.name} is not an emulated HSM"
        write_control(self.control, **keys)

    def stats_path(self, pid: int) -> Path:
        assert self.stats_pattern is not None, f"member {self.name} is not an emulated HSM"
        return Path(self.stats_pattern.replace("{pid}", str(pid)))

    def stats(self, pid: int) -> dict:
        """emuhsm counters of this member as seen by process ``pid`` (final once that
        process has exited)."""
        from tests.fixtures.build import read_stats
        return read_stats(self.stats_path(pid))


_LIST_OBJECTS = r"""
import ctypes
from tests.clients import rv_name
p = P11(LIB)
assert p.initialize() == 0
slot = p.find_slot(LABEL)
rv, s = p.open_session(slot, rw=False)
assert rv == 0, rv_name(rv)
rv = p.login(s, PIN)
assert rv == 0, rv_name(rv)
rv, handles = p.find(s, [], max_objects=4096)
assert rv == 0, rv_name(rv)
BOOLS = {"TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "NEVER_EXTRACTABLE",
         "WRAP_WITH_TRUSTED", "SIGN", "VERIFY", "ENCRYPT", "DECRYPT", "WRAP", "UNWRAP",
         "DERIVE", "MODIFIABLE", "TRUSTED"}
ULONGS = {"CLASS", "KEY_TYPE", "VALUE_LEN"}
out = []
for h in handles:
    o = {"handle": h}
    for name in ARGS["attrs"]:
        rv, t = p.get_attrs(s, h, [getattr(K, "CKA_" + name)])
        v = t.value(0) if rv == 0 else None
        if v is None:
            continue
        if name in BOOLS:
            o[name] = v != b"\x00"
        elif name in ULONGS:
            o[name] = t.ulong(0)
        elif name == "LABEL":
            o[name] = v.decode("utf-8", "replace")
        else:
            o[name] = v.hex()
    out.append(o)
p.C_Logout(s)
p.C_CloseSession(s)
p.C_Finalize(None)
emit(out)
"""


@dataclass
class Group:
    dir: Path
    members: list[GroupMember]
    conf: Path
    log: Path
    module: str                     # libhashim.so
    label: str
    pin: str = softhsm.PIN
    so_pin: str = softhsm.SO_PIN
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """A client's environment: HASHIM_CONF, HASHIM_MODULE (= the module's path)."""
        return base_env(HASHIM_CONF=str(self.conf), HASHIM_MODULE=self.module,
                        **self.extra_env)

    def member(self, name: str) -> GroupMember:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    def run_py(self, code: str, args: Any = None, *, timeout: float = 120,
               env: dict[str, str] | None = None) -> Any:
        """Run a client snippet through the HA slot; ``MODULE``, ``LABEL`` and ``PIN``
        are bound (the hashim module, the HA token's label, the user PIN). Returns what
        the snippet ``emit``s (the snippet should emit ``os.getpid()`` along if it
        wants emuhsm stats)."""
        prelude = ("from tests.clients import emit, P11, Template, K, ulong\n"
                   f"MODULE, LABEL, PIN = {self.module!r}, {self.label!r}, {self.pin!r}\n")
        e = dict(self.env)
        e.update(env or {})
        return result(run_py(prelude + code, e, args, timeout=timeout))

    def hashim(self, *args: str, so_pin: str | None = "", pin: str | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
        """The ``hashim`` command on this group's config (HASHIM_SO_PIN = the group's SO
        PIN unless ``so_pin`` says otherwise; None: unset)."""
        return hashim_cli(self.conf, *args, so_pin=self.so_pin if so_pin == "" else so_pin,
                          pin=pin, timeout=timeout)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def write_config(self, **group) -> Path:
        """Rewrite the config (same members) with other [group] keys."""
        return write_group_config(self.conf, self.members, label=self.label,
                                  log=str(self.log), **group)


def hashim_cli(conf: Path | None, *args: str, so_pin: str | None = softhsm.SO_PIN,
               pin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HASHIM_") and k != "SOFTHSM2_CONF"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "")
                                                       .split(os.pathsep) if p])
    if conf is not None:
        env["HASHIM_CONF"] = str(conf)
    if so_pin is not None:
        env["HASHIM_SO_PIN"] = so_pin
    if pin is not None:
        env["HASHIM_PIN"] = pin
    return subprocess.run([sys.executable, "-m", "shim.cli", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return softhsm.toml_str(str(v))


def write_group_config(path: Path, members: Iterable[GroupMember], *, label: str,
                       **group) -> Path:
    """hashim.toml with [group] ``label`` and ``group`` keys and one [[member]] per
    member, in order (the first is the primary). Every member loads its own library
    copy, so ``private_instance = false``."""
    lines = ["[group]", f"label = {_toml(label)}"]
    lines += [f"{k} = {_toml(v)}" for k, v in group.items() if v is not None]
    for m in members:
        lines += ["", "[[member]]", f"name = {_toml(m.name)}", f"module = {_toml(m.module)}",
                  f"token_label = {_toml(m.label)}", "private_instance = false",
                  f"env = {_toml(m.env)}"]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def hashim_module() -> str:
    """The built hashim module (``HASHIM_MODULE`` overrides ``shim.module_path()``)."""
    if os.environ.get("HASHIM_MODULE"):
        return os.environ["HASHIM_MODULE"]
    env = base_env()
    env.pop("PYTHONPATH", None)
    p = subprocess.run([sys.executable, "-c", "import shim; print(shim.module_path())"],
                       env=env, capture_output=True, text=True, timeout=120, cwd="/")
    path = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    if p.returncode != 0 or not path or not Path(path).is_file():
        raise RuntimeError("hashim module not available (pip install -e . ?): "
                           + p.stderr.strip()[-2000:])
    return path


def make_member(base: Path, name: str, *, emu: bool = False, emu_lib: str | None = None,
                control: dict | None = None, pin: str = softhsm.PIN,
                so_pin: str = softhsm.SO_PIN) -> GroupMember:
    """A fresh SoftHSM2 token labelled ``name`` under ``base/name``; with ``emu`` also
    its own copy of libemuhsm.so forwarding to the token's own SoftHSM2 copy, with a
    control file (``control`` keys, e.g. service_ms=5, capacity=1) and a stats file."""
    tok = softhsm.make_token(base, name, pin=pin, so_pin=so_pin)
    env = {"SOFTHSM2_CONF": str(tok.conf)}
    if not emu:
        return GroupMember(name, tok, tok.lib, env)
    from tests.fixtures.build import build_emuhsm, write_control
    src = emu_lib or build_emuhsm(Path(base) / ".emuhsm-build")
    d = Path(base) / name
    lib = d / "libemuhsm.so"
    shutil.copyfile(src, lib)
    os.chmod(lib, 0o755)
    ctl = d / "emuhsm.control"
    write_control(ctl, **(control or {}))
    stats = str(d / "emuhsm-stats-{pid}")
    env.update({"EMUHSM_BACKEND": tok.lib, "EMUHSM_CONTROL": str(ctl),
                "EMUHSM_STATS": stats})
    return GroupMember(name, tok, str(lib), env, ctl, stats)


def make_group(base: Path, members: int | Iterable[str] = 3, *, emu: bool = False,
               control: dict | list[dict] | None = None, domain: bool = True,
               label: str = "ha-test", module: str | None = None,
               pin: str = softhsm.PIN, so_pin: str = softhsm.SO_PIN, **group) -> Group:
    """A group over fresh tokens: ``members`` names (or a count: m0, m1, ...), each a
    SoftHSM2 token or (``emu``) an emulated HSM over one; ``control`` is every emuhsm
    member's control (one dict) or each one's (a list). The domain key is provisioned
    (``hashim domain init``) unless ``domain=False``. ``group`` keys go to [group]
    (``log`` defaults to base/ha.log). Every token gets user PIN ``pin`` and SO PIN
    ``so_pin``."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    names = [f"m{i}" for i in range(members)] if isinstance(members, int) else list(members)
    controls = control if isinstance(control, list) else [control] * len(names)
    emu_lib = None
    if emu:
        from tests.fixtures.build import build_emuhsm
        emu_lib = build_emuhsm(base / ".emuhsm-build")
    ms = [make_member(base, n, emu=emu, emu_lib=emu_lib, control=c, pin=pin, so_pin=so_pin)
          for n, c in zip(names, controls)]
    log = Path(group.pop("log", None) or base / "ha.log")
    group.setdefault("state_dir", str(base / "state"))
    conf = write_group_config(base / "hashim.toml", ms, label=label, log=str(log), **group)
    g = Group(base, ms, conf, log, module or hashim_module(), label, pin, so_pin)
    if domain:
        domain_init(g)
    return g


def domain_init(g: Group) -> None:
    r = g.hashim("domain", "init")
    if r.returncode != 0:
        raise RuntimeError(f"hashim domain init failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
