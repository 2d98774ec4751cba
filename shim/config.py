"""hashim configuration: one TOML file, read by the module and the ``hashim`` command.

Where the file is (first rule that applies):

1. an explicit path (``hashim --config FILE``, or ``load(path)``),
2. ``$HASHIM_CONF``,
3. ``~/.config/hashim/hashim.toml`` if it exists, else ``/etc/hashim/hashim.toml`` if it
   exists, else ``~/.config/hashim/hashim.toml`` (reported as missing).

The file has one ``[group]`` table and one ``[[member]]`` table per member, in priority
order: the first live member is the primary (it receives key management; the others receive
copies).  Every key below is checked when the file is loaded; an unknown key, a wrong type or
a value out of range is an error naming the file, the table, the key and what to do.

``[group]`` (the table and every key in it are optional)

| key                  | type                      | default    | meaning |
|----------------------|---------------------------|------------|---------|
| `label`              | string, 1..32 bytes UTF-8 | `"hashim"` | token label of the HA slot (the PKCS#11 `label` field) |
| `slot_id`            | integer, 0..4294967295    | `0`        | slot id of the HA slot |
| `serial`             | string, 1..16 ASCII chars | derived    | serial number of the HA token; default: first 16 hex digits of sha256(label) |
| `ha_only`            | boolean                   | `true`     | `false`: each member's own slot is listed too, after the HA slot (administration) |
| `synchronize`        | boolean                   | `true`     | copy missing objects to members at start-up and on recovery |
| `command_timeout`    | number of seconds, > 0    | `20.0`     | a command without completion (or sign of life) for this long fails its member over |
| `heartbeat_interval` | number of seconds, > 0, < `command_timeout` | `2.0` | probe a command still running after this long, then every interval; each answer extends its deadline |
| `recovery_interval`  | number of seconds, > 0    | `60.0`     | seconds between recovery attempts of a failed member |
| `recovery_attempts`  | integer >= 3, or `"unlimited"` | `3`   | recovery attempts before a member is left alone until `hashim recover NAME` |
| `log`                | absolute path             | none       | HA log file (member failures, failovers, recoveries); none: no log file |
| `state_dir`          | absolute path             | derived    | where running modules publish their status for `hashim status` and read `hashim recover` requests; default: `/run/user/UID/hashim/<h>` when `/run/user/UID` is writable, else `/tmp/hashim-UID/<h>`, where `<h>` is the first 16 hex digits of sha256 of the config file's real path. Set it explicitly when the module and `hashim` run as different users. |

``[[member]]`` (at least one; order is priority order)

| key                | type                   | default  | meaning |
|--------------------|------------------------|----------|---------|
| `name`             | string (required)      |          | unique name: letters, digits, `. _ - @ +`, starting with a letter or digit, at most 64 chars |
| `module`           | absolute path (required) |        | the member's PKCS#11 module (e.g. `libsofthsm2.so`, a vendor library, `p11-kit-client.so`) |
| `token_label`      | string, 1..32 bytes    |          | the member token's label; give exactly one of `token_label` / `token_serial` |
| `token_serial`     | string, 1..16 chars    |          | the member token's serial number |
| `private_instance` | boolean                | `false`  | load an independent copy of the module (for modules that keep global state, or several members on one module) |
| `env`              | table of strings       | `{}`     | environment variables the module sees (e.g. `SOFTHSM2_CONF`, `P11_KIT_SERVER_ADDRESS`) |
| `isolate`          | boolean                | `false`  | run the module in its own child process (`p11-kit server`): a crash or hang is contained |

Public API: :func:`default_path`, :func:`load`, :class:`Config`, :class:`GroupConfig`,
:class:`MemberConfig`, :class:`ConfigError`; for writers :func:`edit` (locked, validated,
atomic, comment-preserving) and the document helpers :func:`add_member`,
:func:`remove_member`, :func:`set_group_key`, :func:`unset_group_key`,
:func:`parse_group_value`.  Reading needs only the standard library (``tomllib``);
``tomlkit`` is imported by the editing functions only.
"""
from __future__ import annotations

import difflib
import errno
import fcntl
import hashlib
import math
import os
import re
import stat
import tempfile
import time
import tomllib
from collections.abc import Callable, Collection, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError", "MemberConfig", "GroupConfig", "Config", "default_path", "load",
    "edit", "add_member", "remove_member", "set_group_key", "unset_group_key",
    "parse_group_value", "member_from_dict", "derived_serial", "derived_state_dir",
    "GROUP_KEYS", "MEMBER_KEYS", "USER_PATH", "SYSTEM_PATH", "ENV_VAR",
]

ENV_VAR = "HASHIM_CONF"
USER_PATH = "~/.config/hashim/hashim.toml"
SYSTEM_PATH = "/etc/hashim/hashim.toml"

LABEL_MAX = 32          # CK_TOKEN_INFO.label
SERIAL_MAX = 16         # CK_TOKEN_INFO.serialNumber
SLOT_ID_MAX = 2**32 - 1
MIN_RECOVERY_ATTEMPTS = 3
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}\Z")

GROUP_KEYS = ("label", "slot_id", "serial", "ha_only", "synchronize", "command_timeout",
              "heartbeat_interval", "recovery_interval", "recovery_attempts", "log",
              "state_dir")
MEMBER_KEYS = ("name", "module", "token_label", "token_serial", "private_instance", "env",
               "isolate")
TOP_KEYS = ("group", "member")


# --------------------------------------------------------------------------- errors

class ConfigError(Exception):
    """A configuration problem.  ``str(e)`` is one line:
    ``"<file>: <where> <key>: <problem>; <what to do>"`` (parts that do not apply are left
    out).  The parts are also attributes: ``file``, ``where``, ``key``, ``problem``,
    ``hint``; ``errors`` lists every problem found (the first one is ``self``)."""

    def __init__(self, problem: str, hint: str | None = None, *, file: str | None = None,
                 where: str | None = None, key: str | None = None):
        self.problem = problem
        self.hint = hint
        self.file = file
        self.where = where
        self.key = key
        self.errors: list[ConfigError] = [self]
        super().__init__(self._text())

    def _text(self) -> str:
        head = " ".join(p for p in (self.where, self.key) if p)
        parts = []
        if self.file:
            parts.append(self.file + ": ")
        if head:
            parts.append(head + ": ")
        parts.append(self.problem)
        if self.hint:
            parts.append("; " + self.hint)
        return " ".join("".join(parts).split("\n")).replace("\r", " ")

    def __str__(self) -> str:
        return self._text()


# --------------------------------------------------------------------------- data

@dataclass(frozen=True)
class MemberConfig:
    name: str
    module: str
    token_label: str | None
    token_serial: str | None
    private_instance: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    isolate: bool = False


@dataclass(frozen=True)
class GroupConfig:
    label: str = "hashim"
    slot_id: int = 0
    serial: str | None = None            # None -> derived_serial(label); load() fills it in
    ha_only: bool = True
    synchronize: bool = True
    command_timeout: float = 20.0
    heartbeat_interval: float = 2.0
    recovery_interval: float = 60.0
    recovery_attempts: int | None = 3    # None: unlimited
    log: str | None = None
    state_dir: str | None = None         # None -> derived_state_dir(path); load() fills it in


@dataclass(frozen=True)
class Config:
    path: str
    group: GroupConfig
    members: tuple[MemberConfig, ...]
    mtime: float

    @property
    def member_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    @property
    def primary_candidate(self) -> MemberConfig:
        """The first configured member (the primary while it is live)."""
        return self.members[0]

    def member(self, name: str) -> MemberConfig:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)


def derived_serial(label: str) -> str:
    """Default serial number of the HA token: first 16 hex digits of sha256(label)."""
    return hashlib.sha256(label.encode("utf-8")).hexdigest()[:SERIAL_MAX]


def derived_state_dir(config_path: str) -> str:
    """Default state directory for a config file (not created here)."""
    real = os.path.realpath(os.path.abspath(os.path.expanduser(config_path)))
    h = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    uid = os.getuid()
    run = f"/run/user/{uid}"
    if os.path.isdir(run) and os.access(run, os.W_OK | os.X_OK):
        return os.path.join(run, "hashim", h)
    return os.path.join(tempfile.gettempdir(), f"hashim-{uid}", h)


def default_path(explicit: str | None = None) -> str:
    """The config file to use: ``explicit``, else ``$HASHIM_CONF``, else the first of
    ``~/.config/hashim/hashim.toml`` and ``/etc/hashim/hashim.toml`` that exists, else the
    first of them.  Always absolute; the file may not exist."""
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    env = os.environ.get(ENV_VAR)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    candidates = [os.path.expanduser(USER_PATH), SYSTEM_PATH]
    for c in candidates:
        if os.path.exists(c):
            return os.path.abspath(c)
    return os.path.abspath(candidates[0])


# --------------------------------------------------------------------------- reading

_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*$")


def _toml_error(path: str, exc: Exception, text: str) -> ConfigError:
    msg = str(exc)
    m = _TOML_POS.search(msg)
    if m:
        line, col = int(m.group(1)), int(m.group(2))
        msg = msg[:m.start()]
        return ConfigError(f"not valid TOML: {msg} (column {col})",
                           f"fix the syntax on line {line}", file=path, where=f"line {line}")
    m = _TOML_END.search(msg)
    if m:
        line = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
        msg = msg[:m.start()]
        return ConfigError(f"not valid TOML: {msg} (at end of file)",
                           f"fix the syntax on line {max(line, 1)}", file=path,
                           where=f"line {max(line, 1)}")
    return ConfigError(f"not valid TOML: {msg}", "fix the syntax", file=path)


def _missing_error(path: str) -> ConfigError:
    return ConfigError(
        "file not found",
        "create it (e.g. 'hashim group add-member NAME --module PATH --token-label L' "
        f"creates one), or point --config or {ENV_VAR} at an existing file", file=path)


def _os_error(path: str, exc: OSError, doing: str = "read") -> ConfigError:
    if isinstance(exc, FileNotFoundError):
        return _missing_error(path)
    if isinstance(exc, IsADirectoryError):
        return ConfigError("is a directory, not a file", "give the path of the TOML file",
                           file=path)
    if isinstance(exc, PermissionError):
        return ConfigError(f"cannot {doing} it: permission denied",
                           f"run as a user who may {doing} it, or fix its permissions",
                           file=path)
    return ConfigError(f"cannot {doing} it: {exc.strerror or exc}",
                       "check the file and its directory", file=path)


def _read_bytes(path: str) -> tuple[bytes, os.stat_result]:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            data = f.read()
    except OSError as e:
        raise _os_error(path, e) from None
    return data, st


def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError("not UTF-8 text", f"save the file as UTF-8 (bad byte on line {line})",
                          file=path, where=f"line {line}") from None


def _parse(path: str, text: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_error(path, e, text) from None


def load(path: str | None = None, *, check_files: bool = True) -> Config:
    """Read and validate the config file (see :func:`default_path` for which one).

    ``check_files``: also check that every member's module is an existing readable file.
    Raises :class:`ConfigError`."""
    p = default_path(path)
    data, st = _read_bytes(p)
    doc = _parse(p, _decode(p, data))
    group, members = _validate(doc, p, check_files=check_files)
    return Config(path=p, group=group, members=members, mtime=st.st_mtime)


# --------------------------------------------------------------------------- validation

def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    return "a date/time"


def _show(v: Any) -> str:
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, (dict, list)):
        s = _kind(v)
        return s
    else:
        s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _suggest(key: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key.lower().replace("-", "_"), list(known), n=1,
                                          cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "known keys: " + ", ".join(known)


class _V:
    """Collects problems; the first one is raised with all of them attached."""

    def __init__(self, file: str):
        self.file = file
        self.errors: list[ConfigError] = []

    def err(self, where: str | None, key: str | None, problem: str, hint: str) -> None:
        self.errors.append(ConfigError(problem, hint, file=self.file, where=where, key=key))

    def raise_if_any(self) -> None:
        if self.errors:
            first = self.errors[0]
            first.errors = list(self.errors)
            raise first

    # typed getters: return the value, or None after recording a problem
    def boolean(self, where, tbl, key, default):
        if key not in tbl:
            return default
        v = tbl[key]
        if not isinstance(v, bool):
            self.err(where, key, f"must be true or false, got {_show(v)} ({_kind(v)})",
                     "write true or false without quotes")
            return default
        return v

    def seconds(self, where, tbl, key, default):
        if key not in tbl:
            return default
        v = tbl[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.err(where, key, f"must be a number of seconds, got {_show(v)} ({_kind(v)})",
                     "write a number without quotes, e.g. 20 or 2.5")
            return None
        v = float(v)
        if not math.isfinite(v) or v <= 0:
            self.err(where, key, f"must be a positive number of seconds, got {_show(v)}",
                     "use a finite number greater than 0")
            return None
        return v

    def string(self, where, tbl, key, default, *, required=False):
        if key not in tbl:
            if required:
                self.err(where, key, "missing", f"add {key} = \"...\" to this table")
            return default
        v = tbl[key]
        if not isinstance(v, str):
            self.err(where, key, f"must be a string, got {_show(v)} ({_kind(v)})",
                     "put the value in double quotes")
            return None
        if v == "":
            self.err(where, key, "is empty", "give a value or remove the key")
            return None
        return v


def _check_abs_path(v: _V, where, key, value: str, example: str) -> bool:
    if "\0" in value:
        v.err(where, key, "contains a NUL character", "give a plain path")
        return False
    if not os.path.isabs(value):
        v.err(where, key, f"must be an absolute path, got {_show(value)}",
              f"give the full path, e.g. {example}")
        return False
    return True


def _check_label(v: _V, where, key, value: str, what: str) -> None:
    n = len(value.encode("utf-8"))
    if n > LABEL_MAX:
        v.err(where, key, f"is {n} bytes in UTF-8, longer than the {LABEL_MAX} bytes of a "
              f"PKCS#11 {what}", f"shorten it to at most {LABEL_MAX} bytes")
    elif not value.isprintable():
        v.err(where, key, "contains control characters", "use printable characters only")
    elif value != value.strip(" "):
        v.err(where, key, "starts or ends with a space (PKCS#11 pads labels with spaces, so "
              "they would be lost)", "remove the leading/trailing spaces")


def _check_serial(v: _V, where, key, value: str) -> None:
    if not value.isascii() or not value.isprintable():
        v.err(where, key, "must be printable ASCII", "use letters and digits")
    elif len(value) > SERIAL_MAX:
        v.err(where, key, f"is {len(value)} characters, longer than the {SERIAL_MAX} of a "
              "PKCS#11 serial number", f"shorten it to at most {SERIAL_MAX} characters")
    elif value != value.strip(" "):
        v.err(where, key, "starts or ends with a space", "remove the spaces")


def _unknown_keys(v: _V, where: str, tbl: dict, known: Collection[str]) -> None:
    for k in tbl:
        if k not in known:
            v.err(where, k, "unknown key", _suggest(k, known))


def _validate_group(v: _V, g: dict, path: str, check_files) -> GroupConfig:
    W = "[group]"
    _unknown_keys(v, W, g, GROUP_KEYS)
    d = GroupConfig()
    label = v.string(W, g, "label", d.label)
    if label is not None and "label" in g:
        _check_label(v, W, "label", label, "token label")
    slot_id = d.slot_id
    if "slot_id" in g:
        s = g["slot_id"]
        if isinstance(s, bool) or not isinstance(s, int):
            v.err(W, "slot_id", f"must be an integer, got {_show(s)} ({_kind(s)})",
                  "write a whole number without quotes, e.g. 0")
        elif not 0 <= s <= SLOT_ID_MAX:
            v.err(W, "slot_id", f"must be between 0 and {SLOT_ID_MAX}, got {s}",
                  "use a small non-negative number, e.g. 0")
        else:
            slot_id = s
    serial = v.string(W, g, "serial", None)
    if serial is not None:
        _check_serial(v, W, "serial", serial)
    ha_only = v.boolean(W, g, "ha_only", d.ha_only)
    sync = v.boolean(W, g, "synchronize", d.synchronize)
    ct = v.seconds(W, g, "command_timeout", d.command_timeout)
    hb = v.seconds(W, g, "heartbeat_interval", d.heartbeat_interval)
    ri = v.seconds(W, g, "recovery_interval", d.recovery_interval)
    if ct is not None and hb is not None and hb >= ct:
        key = "heartbeat_interval" if "heartbeat_interval" in g else "command_timeout"
        v.err(W, key, f"heartbeat_interval ({hb:g} s) must be shorter than command_timeout "
              f"({ct:g} s)", "lower heartbeat_interval or raise command_timeout")
    attempts: int | None = d.recovery_attempts
    if "recovery_attempts" in g:
        a = g["recovery_attempts"]
        if isinstance(a, str):
            if a.strip().lower() == "unlimited":
                attempts = None
            else:
                v.err(W, "recovery_attempts", f"must be a number or \"unlimited\", got {_show(a)}",
                      f"write a whole number >= {MIN_RECOVERY_ATTEMPTS} or \"unlimited\"")
        elif isinstance(a, bool) or not isinstance(a, int):
            v.err(W, "recovery_attempts", f"must be a whole number or \"unlimited\", got "
                  f"{_show(a)} ({_kind(a)})",
                  f"write a whole number >= {MIN_RECOVERY_ATTEMPTS} or \"unlimited\"")
        elif a < MIN_RECOVERY_ATTEMPTS:
            v.err(W, "recovery_attempts", f"must be at least {MIN_RECOVERY_ATTEMPTS}, got {a}",
                  f"use {MIN_RECOVERY_ATTEMPTS} or more, or \"unlimited\"")
        else:
            attempts = a
    log = v.string(W, g, "log", None)
    if log is not None:
        _check_abs_path(v, W, "log", log, "/var/log/hashim/ha.log")
    state_dir = v.string(W, g, "state_dir", None)
    if state_dir is not None:
        _check_abs_path(v, W, "state_dir", state_dir, "/run/hashim/payments")
    return GroupConfig(
        label=label if label is not None else d.label,
        slot_id=slot_id,
        serial=serial if serial is not None else derived_serial(label or d.label),
        ha_only=ha_only, synchronize=sync,
        command_timeout=ct if ct is not None else d.command_timeout,
        heartbeat_interval=hb if hb is not None else d.heartbeat_interval,
        recovery_interval=ri if ri is not None else d.recovery_interval,
        recovery_attempts=attempts,
        log=log,
        state_dir=state_dir if state_dir is not None else derived_state_dir(path))


def _member_where(m: Any, index: int) -> str:
    if isinstance(m, dict):
        n = m.get("name")
        if isinstance(n, str) and NAME_RE.match(n):
            return f"member '{n}'"
    return f"[[member]] #{index}"


def _validate_member(v: _V, m: dict, index: int, check_files: bool) -> MemberConfig | None:
    W = _member_where(m, index)
    nerr = len(v.errors)
    _unknown_keys(v, W, m, MEMBER_KEYS)
    name = v.string(W, m, "name", None, required=True)
    if name is not None and not NAME_RE.match(name):
        v.err(W, "name", f"{_show(name)} is not a valid member name",
              "use letters, digits and . _ - @ + (starting with a letter or digit, "
              "at most 64 characters)")
    module = v.string(W, m, "module", None, required=True)
    if module is not None and _check_abs_path(v, W, "module", module,
                                              "/usr/lib/softhsm/libsofthsm2.so"):
        if check_files:
            _check_module_file(v, W, module)
    tl = v.string(W, m, "token_label", None)
    if tl is not None:
        _check_label(v, W, "token_label", tl, "token label")
    ts = v.string(W, m, "token_serial", None)
    if ts is not None:
        _check_serial(v, W, "token_serial", ts)
    if "token_label" in m and "token_serial" in m:
        v.err(W, "token_serial", "both token_label and token_serial are given",
              "keep exactly one of them")
    elif "token_label" not in m and "token_serial" not in m:
        v.err(W, "token_label", "missing: the member's token is not identified",
              "add token_label = \"...\" or token_serial = \"...\" (exactly one)")
    private = v.boolean(W, m, "private_instance", False)
    isolate = v.boolean(W, m, "isolate", False)
    env: dict[str, str] = {}
    if "env" in m:
        e = m["env"]
        if not isinstance(e, dict):
            v.err(W, "env", f"must be a table of strings, got {_kind(e)}",
                  "write env = { NAME = \"value\" }")
        else:
            for k, val in e.items():
                if k == "" or "=" in k or "\0" in k:
                    v.err(W, "env", f"{k!r} is not a valid environment variable name",
                          "use a name without '=' such as SOFTHSM2_CONF")
                elif not isinstance(val, str):
                    # never show env values: they may be secrets
                    v.err(W, f"env.{k}", f"must be a string, got {_kind(val)}",
                          "put the value in double quotes")
                elif "\0" in val:
                    v.err(W, f"env.{k}", "contains a NUL character", "remove it")
                else:
                    env[k] = val
    if len(v.errors) != nerr:
        return None
    return MemberConfig(name=name, module=module, token_label=tl, token_serial=ts,
                        private_instance=private, env=env, isolate=isolate)


def _check_module_file(v: _V, where: str, module: str) -> None:
    try:
        st = os.stat(module)
    except FileNotFoundError:
        v.err(where, "module", f"{module} does not exist",
              "install the module or correct the path")
        return
    except OSError as e:
        v.err(where, "module", f"cannot access {module}: {e.strerror}",
              "check the path and its permissions")
        return
    if not stat.S_ISREG(st.st_mode):
        v.err(where, "module", f"{module} is not a regular file",
              "give the path of the module's shared library (.so)")
    elif not os.access(module, os.R_OK):
        v.err(where, "module", f"{module} is not readable by this user",
              "fix its permissions or run as a user who can read it")


def _token_key(m: MemberConfig) -> tuple:
    return (os.path.normpath(m.module), m.token_label, m.token_serial,
            tuple(sorted(m.env.items())))


def _validate(data: dict, path: str, *, check_files: bool | Collection[str]
              ) -> tuple[GroupConfig, tuple[MemberConfig, ...]]:
    v = _V(path)
    _unknown_keys(v, "top level", data, TOP_KEYS)
    g = data.get("group", {})
    if not isinstance(g, dict):
        v.err("top level", "group", f"must be a table, got {_kind(g)}",
              "write a single [group] table")
        g = {}
    group = _validate_group(v, g, path, check_files)
    raw = data.get("member", [])
    if isinstance(raw, dict):
        v.err("top level", "member", "is a single [member] table",
              "write each member as [[member]] (double brackets)")
        raw = []
    elif not isinstance(raw, list):
        v.err("top level", "member", f"must be an array of tables, got {_kind(raw)}",
              "write each member as a [[member]] table")
        raw = []
    members: list[MemberConfig] = []
    seen: dict[str, int] = {}
    tokens: dict[tuple, str] = {}
    for i, m in enumerate(raw, 1):
        if not isinstance(m, dict):
            v.err(f"[[member]] #{i}", None, f"must be a table, got {_kind(m)}",
                  "write each member as a [[member]] table")
            continue
        n = m.get("name")
        chk = check_files if isinstance(check_files, bool) else n in check_files
        mc = _validate_member(v, m, i, chk)
        if isinstance(n, str) and n:
            if n in seen:
                v.err(f"[[member]] #{i}", "name", f"'{n}' is already the name of "
                      f"[[member]] #{seen[n]}", "give each member a unique name")
                continue
            seen[n] = i
        if mc is None:
            continue
        tk = _token_key(mc)
        if tk in tokens:
            v.err(_member_where(m, i), "token_label" if mc.token_label else "token_serial",
                  f"refers to the same token as member '{tokens[tk]}' (same module, token "
                  "and env)", "remove one of them or point it at another token")
            continue
        tokens[tk] = mc.name
        members.append(mc)
    if not raw and isinstance(data.get("member", []), list):
        v.err("[[member]]", None, "no members configured",
              "add at least one [[member]] table (hashim group add-member NAME ...)")
    v.raise_if_any()
    return group, tuple(members)


def member_from_dict(d: Mapping[str, Any], *, file: str = "<command line>", index: int = 1,
                     check_files: bool = True) -> MemberConfig:
    """Validate one member given as a dict with the ``[[member]]`` keys (same rules and
    messages as in the file).  Raises :class:`ConfigError`."""
    v = _V(file)
    mc = _validate_member(v, dict(d), index, check_files)
    v.raise_if_any()
    assert mc is not None
    return mc


# --------------------------------------------------------------------------- editing

def parse_group_value(key: str, text: str, *, file: str | None = None) -> Any:
    """Turn a command-line string into the TOML value for ``[group] key`` (the range checks
    are done by the validator).  Raises :class:`ConfigError` for an unknown key or a value
    of the wrong type."""
    W = "[group]"
    if key not in GROUP_KEYS:
        raise ConfigError("unknown key", _suggest(key, GROUP_KEYS), file=file, where=W,
                          key=key)
    t = text.strip()
    if key in ("ha_only", "synchronize"):
        low = t.lower()
        if low in ("true", "yes", "on", "1", "enable", "enabled"):
            return True
        if low in ("false", "no", "off", "0", "disable", "disabled"):
            return False
        raise ConfigError(f"must be true or false, got {text!r}", "give true or false",
                          file=file, where=W, key=key)
    if key in ("command_timeout", "heartbeat_interval", "recovery_interval"):
        try:
            f = float(t)
        except ValueError:
            f = math.nan
        if not math.isfinite(f):
            raise ConfigError(f"must be a number of seconds, got {text!r}",
                              "give a number such as 20 or 2.5", file=file, where=W, key=key)
        return f
    if key == "slot_id":
        try:
            return int(t, 10)
        except ValueError:
            raise ConfigError(f"must be an integer, got {text!r}", "give a whole number",
                              file=file, where=W, key=key) from None
    if key == "recovery_attempts":
        if t.lower() == "unlimited":
            return "unlimited"
        try:
            return int(t, 10)
        except ValueError:
            raise ConfigError(f"must be a whole number or \"unlimited\", got {text!r}",
                              f"give a number >= {MIN_RECOVERY_ATTEMPTS} or unlimited",
                              file=file, where=W, key=key) from None
    return text


def _trailing_start(body: list) -> int:
    """Index in a tomlkit container body where its trailing comments/blank lines start."""
    from tomlkit.items import Comment, Whitespace
    i = len(body)
    while i > 0 and body[i - 1][0] is None and isinstance(body[i - 1][1], (Comment, Whitespace)):
        i -= 1
    return i


def _group_table(doc, *, create: bool):
    import tomlkit
    from tomlkit.items import AoT, Table
    if "group" in doc:
        g = doc["group"]
        if not isinstance(g, Table):
            raise ConfigError(f"must be a table, got {type(g).__name__}",
                              "write a single [group] table", where="top level", key="group")
        return g
    if not create:
        return None
    t = tomlkit.table()
    # put [group] before the first [[member]] (or at the end)
    idx = None
    for i, (k, item) in enumerate(doc.body):
        if k is not None and isinstance(item, (Table, AoT)):
            idx = i
            break
    if idx is None:
        doc.append("group", t)
    else:
        t.add(tomlkit.nl())
        doc._insert_at(idx, "group", t)
    return doc["group"]


def set_group_key(doc, key: str, value: Any) -> None:
    """Set ``[group] key = value`` in a tomlkit document, creating ``[group]`` if needed and
    keeping comments (a new key goes after the table's last key, before trailing
    comments)."""
    import tomlkit
    g = _group_table(doc, create=True)
    if key in g:
        g[key] = value
        return
    body = g.value.body
    idx = _trailing_start(body)
    if idx == len(body):
        g.add(key, value)
    else:
        g.value._insert_at(idx, key, tomlkit.item(value))


def unset_group_key(doc, key: str) -> bool:
    """Remove ``[group] key`` (back to its default).  Returns whether it was there."""
    g = _group_table(doc, create=False)
    if g is None or key not in g:
        return False
    del g[key]
    return True


def _members_aot(doc, *, create: bool):
    import tomlkit
    from tomlkit.items import AoT
    if "member" not in doc:
        if not create:
            return None
        doc.append("member", tomlkit.aot())
        return doc["member"]
    a = doc["member"]
    if not isinstance(a, AoT):
        raise ConfigError("is not an array of [[member]] tables",
                          "write each member as a [[member]] table", where="top level",
                          key="member")
    return a


def add_member(doc, member: MemberConfig | Mapping[str, Any]) -> None:
    """Append a ``[[member]]`` table to a tomlkit document (keys in the documented order,
    defaults left out)."""
    import tomlkit
    if isinstance(member, MemberConfig):
        d = {"name": member.name, "module": member.module,
             "token_label": member.token_label, "token_serial": member.token_serial,
             "private_instance": member.private_instance, "env": dict(member.env),
             "isolate": member.isolate}
    else:
        d = dict(member)
    t = tomlkit.table()
    for k in MEMBER_KEYS:
        val = d.get(k)
        if val is None or (k in ("private_instance", "isolate") and val is False) \
                or (k == "env" and not val):
            continue
        if k == "env":
            it = tomlkit.inline_table()
            it.update({str(a): str(b) for a, b in val.items()})
            t.add(k, it)
        else:
            t.add(k, val)
    for k, val in d.items():         # keys not in the documented list: let validation judge
        if k not in MEMBER_KEYS:
            t.add(k, val)
    aot = _members_aot(doc, create=True)
    if len(aot):
        # comments after the last member end the file: keep them after the new one
        body = aot[-1].value.body
        start = _trailing_start(body)
        tail = list(body[start:])
        del body[start:]
        t.value.body.extend(tail)
        before = aot[-1].as_string()
    else:
        before = doc.as_string()
    t.trivia.indent = "" if (not before.strip() or before.endswith("\n\n")) else "\n"
    aot.append(t)


def remove_member(doc, name: str) -> None:
    """Remove the ``[[member]]`` named ``name`` from a tomlkit document.  Comments written
    above the next member stay with it.  Raises ``KeyError`` if there is no such member."""
    aot = _members_aot(doc, create=False)
    if aot is None:
        raise KeyError(name)
    idx = None
    for i, t in enumerate(aot):
        if t.get("name") == name:
            idx = i
            break
    if idx is None:
        raise KeyError(name)
    removed = aot[idx].value.body
    tail = list(removed[_trailing_start(removed):])
    # Comments just above a [[member]] header are stored at the end of the container before
    # it.  Those above the removed table described it: replace them with the removed table's
    # own tail (which describes the member after it, or ends the file).
    prev = None
    if idx > 0:
        prev = aot[idx - 1].value
    else:
        from tomlkit.items import Table
        pos = next((i for i, (k, _) in enumerate(doc.body)
                    if k is not None and k.key == "member"), None)
        if pos:
            item = doc.body[pos - 1][1]
            if isinstance(item, Table):
                prev = item.value
    del aot[idx]
    if prev is not None:
        # only keyless trivia at the very end is touched: key positions stay valid
        from tomlkit.items import Whitespace
        start = _trailing_start(prev.body)
        old = prev.body[start:]
        if any(isinstance(x, Whitespace) for _, x in old) and \
                not any(isinstance(x, Whitespace) for _, x in tail):
            tail.insert(0, (None, Whitespace("\n")))     # keep a blank line
        del prev.body[start:]
        prev.body.extend(tail)


def _snapshot(path: str) -> tuple[bytes, int, int, str, int] | None:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _os_error(path, e) from None
    return data, st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest(), st.st_mode


@contextmanager
def _locked(lock_path: str, timeout: float, file: str):
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"cannot open the lock file {lock_path}: {e.strerror}",
                              "run as a user who may write the config directory",
                              file=file) from None
    except OSError as e:
        raise ConfigError(f"cannot create the lock file {lock_path}: {e.strerror}",
                          "run as a user who may write the config directory",
                          file=file) from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        f"another hashim command is editing it (lock {lock_path} held for "
                        f"{timeout:g} s)", "wait for it to finish and try again",
                        file=file) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)     # releases the lock


def _atomic_write(path: str, data: bytes, mode: int | None, owner: tuple[int, int] | None
                  ) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), stat.S_IMODE(mode) if mode is not None else 0o644)
            if owner is not None and os.geteuid() == 0:
                try:
                    os.fchown(f.fileno(), *owner)
                except OSError:
                    pass
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        try:
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


NEW_FILE_HEADER = ("# hashim configuration: one [group], one [[member]] per member in priority\n"
                   "# order. Check with 'hashim config check'; keys are documented in the "
                   "README.\n")


def edit(path: str | None, fn: Callable[[Any], Any], *,
         check_files: bool | Collection[str] = False, create: bool = False,
         lock_timeout: float = 10.0) -> Config:
    """Change the config file: read it with tomlkit, call ``fn(doc)`` (it changes ``doc`` in
    place, or returns a replacement tomlkit document), validate the result with the same rules as
    :func:`load`, and write it atomically (temp file in the same directory, fsync,
    ``os.replace``), keeping comments and layout.

    Writers are serialised with an ``fcntl`` lock on ``<path>.lock``; if the file changed on
    disk between reading and writing (mtime, size or content), nothing is written and
    :class:`ConfigError` is raised.  ``check_files``: True to check every member's module
    file, or a collection of member names to check only those.  ``create``: start from an
    empty document when the file does not exist.  ``fn`` may raise :class:`ConfigError`
    (its ``file`` is filled in).  Returns the new :class:`Config`."""
    import tomlkit
    p = default_path(path)
    real = os.path.realpath(p)
    if create:
        try:
            os.makedirs(os.path.dirname(real), exist_ok=True)
        except OSError as e:
            raise _os_error(os.path.dirname(real), e, "create") from None
    elif not os.path.exists(real):
        raise _missing_error(p)
    with _locked(real + ".lock", lock_timeout, p):
        before = _snapshot(real)
        if before is None:
            if not create:
                raise _missing_error(p)
            text = ""
            doc = tomlkit.parse(NEW_FILE_HEADER)
        else:
            text = _decode(p, before[0])
            _parse(p, text)                      # precise syntax errors from tomllib
            try:
                doc = tomlkit.parse(text)
            except Exception as e:               # tomllib accepted it; should not happen
                raise ConfigError(f"cannot be edited: {e}", "fix it by hand", file=p) from None
        try:
            res = fn(doc)
        except ConfigError as e:
            if e.file is None:
                e.file = p
                e.args = (e._text(),)
            raise
        if res is not None and hasattr(res, "as_string"):
            doc = res
        new_text = doc.as_string()
        if new_text and not new_text.endswith("\n"):
            new_text += "\n"
        data = _parse(p, new_text)
        group, members = _validate(data, p, check_files=check_files)
        now = _snapshot(real)
        if (before is None) != (now is None) or (
                before is not None and now is not None and before[1:4] != now[1:4]):
            raise ConfigError("changed on disk while hashim was editing it, nothing was "
                              "written", "check the file and run the command again", file=p)
        if new_text != text:
            owner = None
            if before is not None:
                try:
                    st = os.stat(real)
                    owner = (st.st_uid, st.st_gid)
                except OSError:
                    pass
            try:
                _atomic_write(real, new_text.encode("utf-8"),
                              before[4] if before is not None else None, owner)
            except OSError as e:
                raise _os_error(p, e, "write") from None
        st = os.stat(real)
    return Config(path=p, group=group, members=members, mtime=st.st_mtime)
