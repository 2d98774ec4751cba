"""``hashim``: the operator's command (console script ``hashim = shim.cli:main``).

Exit codes: 0 success, 1 the operation failed (a member check, a recovery, a command not in
this build), 2 usage or configuration error.  Errors are one line on stderr naming what to
fix; no tracebacks (set ``HASHIM_DEBUG=1`` to get them for unexpected errors).

Every subcommand accepts ``--config FILE`` (before or after the subcommand); without it the
file is ``$HASHIM_CONF``, else the default path (see :mod:`shim.config`).

Commands implemented in other modules (``PLUGINS`` below) are looked up when they run:
``status``, ``log``, ``recover``, ``domain``, ``demo``.  Such a module provides
``main(args) -> int | None`` (``args`` is the parsed ``argparse.Namespace``, with
``args.config`` the ``--config`` value or None, ``args.config_path`` the resolved file, and
``args.command`` / ``args.domain_command`` the (sub)command) and may provide
``add_arguments(name, parser)``, called for each of its parsers (``"status"``,
``"domain init"``, ...) before parsing, to add options beyond the documented ones.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from typing import Any, Sequence

from . import config as cfg
from .config import ConfigError, MemberConfig

PROG = "hashim"

# command -> (module, function); the module is imported only when the command runs
PLUGINS: dict[str, tuple[str, str]] = {
    "status": ("shim.status", "main"),
    "log": ("shim.logs", "main"),
    "recover": ("shim.recover", "main"),
    "domain": ("shim.domain", "main"),
    "demo": ("shim.demo", "main"),
}

SECRET_ENV = re.compile(r"PIN|PASS|SECRET|PWD", re.IGNORECASE)
MASK = "********"


class UsageError(Exception):
    """A usage error: printed as one line, exit code 2."""


class OperationFailed(Exception):
    """The operation failed: printed as one line, exit code 1."""


# --------------------------------------------------------------------------- hooks

def check_new_member(member_config: MemberConfig) -> list[str]:
    """Check a member before ``hashim group add-member`` writes it: returns the problems
    found (empty list: ok).  Called unless ``--no-check``.

    The module is loaded in a child process (private instance and env honoured; a crash
    or a hang -- killed after 30 s -- is reported as a problem), the token looked up by
    label/serial, the user PIN ($HASHIM_PIN, or a prompt on a terminal; none is a problem)
    tried, and the group's domain key looked for (present and trusted); see
    :func:`shim.domain.check_new_member`."""
    from .domain import check_new_member as check
    return check(member_config)


# --------------------------------------------------------------------------- argparse

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and no exit on its own (main() maps SystemExit)."""

    def __init__(self, *a, **kw):
        kw.setdefault("allow_abbrev", False)
        super().__init__(*a, **kw)

    def error(self, message: str):  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: {message}; see '{self.prog} --help'\n")


def _config_option(p: argparse.ArgumentParser, top: bool) -> None:
    p.add_argument("--config", metavar="FILE",
                   default=None if top else argparse.SUPPRESS,
                   help="config file (default: $HASHIM_CONF, else "
                        f"{cfg.USER_PATH}, else {cfg.SYSTEM_PATH})")


def _sub(sp, name: str, help: str, **kw) -> argparse.ArgumentParser:
    p = sp.add_parser(name, help=help, description=kw.pop("description", help), **kw)
    _config_option(p, False)
    return p


def _member_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="member name (unique in the group)")
    p.add_argument("--module", required=True, metavar="PATH",
                   help="the member's PKCS#11 module (made absolute)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--token-label", metavar="L", help="label of the member's token")
    tok.add_argument("--token-serial", metavar="S", help="serial number of the member's token")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="environment variable the module sees (repeatable)")
    p.add_argument("--private-instance", action="store_true",
                   help="load an independent instance of the module")
    p.add_argument("--isolate", action="store_true",
                   help="run the module in its own child process (p11-kit server)")


def _pin_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pin-file", metavar="FILE",
                   help="read the user PIN from FILE (default: $HASHIM_PIN, or a prompt)")
    p.add_argument("--so-pin-file", metavar="FILE",
                   help="read the security officer PIN from FILE "
                        "(default: $HASHIM_SO_PIN, or a prompt)")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and the parsers of plugin commands by name ("status", "domain init"...)."""
    top = _Parser(prog=PROG, description="Administer a hashim HA group (a PKCS#11 module "
                  "presenting one slot backed by several tokens).")
    _config_option(top, True)
    sp = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    plug: dict[str, argparse.ArgumentParser] = {}

    p = _sub(sp, "module-path", "print the absolute path of the built module")
    p.set_defaults(func=cmd_module_path)

    p = _sub(sp, "demo", "a SoftHSM2 group behind the HA slot, used by a real client")
    plug["demo"] = p

    p = _sub(sp, "config", "configuration file commands")
    csp = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", parser_class=_Parser,
                           required=True)
    c = _sub(csp, "check", "validate the config file without loading any module")
    c.add_argument("file", nargs="?", metavar="FILE", help="file to check (default: --config, "
                   "$HASHIM_CONF, the default path)")
    c.set_defaults(func=cmd_config_check)

    p = _sub(sp, "status", "members as seen by running modules (merged)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    plug["status"] = p

    p = _sub(sp, "log", "the HA log")
    p.add_argument("--member", metavar="NAME", help="only lines about this member")
    p.add_argument("--since", metavar="T",
                   help="only lines since T (ISO time, or a duration such as 10m, 2h)")
    plug["log"] = p

    p = _sub(sp, "recover", "ask running modules to retry a member now")
    p.add_argument("name", metavar="NAME", help="member to recover")
    plug["recover"] = p

    p = _sub(sp, "domain", "the group's domain key (wraps keys copied between members)")
    dsp = p.add_subparsers(dest="domain_command", metavar="SUBCOMMAND", parser_class=_Parser,
                           required=True)
    plug["domain"] = p
    d = _sub(dsp, "init", "create the domain key on every member")
    _pin_options(d)
    plug["domain init"] = d
    d = _sub(dsp, "check", "check that every member has the same trusted domain key")
    _pin_options(d)
    plug["domain check"] = d
    d = _sub(dsp, "add-member", "put the domain key on a new token, from a member")
    _member_options(d)
    d.add_argument("--from", dest="from_member", metavar="MEMBER",
                   help="member to copy the domain key from (default: the first live one)")
    _pin_options(d)
    plug["domain add-member"] = d

    p = _sub(sp, "group", "show and change the group's configuration")
    gsp = p.add_subparsers(dest="group_command", metavar="SUBCOMMAND", parser_class=_Parser,
                           required=True)
    g = _sub(gsp, "show", "members in priority order and the group's settings")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_group_show)

    g = _sub(gsp, "add-member", "append a member (lowest priority)")
    _member_options(g)
    g.add_argument("--no-check", action="store_true",
                   help="do not check the module file, token, PIN and domain key first")
    g.set_defaults(func=cmd_group_add_member)

    g = _sub(gsp, "remove-member", "remove a member")
    g.add_argument("name", metavar="NAME")
    g.set_defaults(func=cmd_group_remove_member)

    g = _sub(gsp, "synchronize", "turn object synchronisation on or off, or run it now")
    x = g.add_mutually_exclusive_group(required=True)
    x.add_argument("--enable", dest="state", action="store_const", const=True)
    x.add_argument("--disable", dest="state", action="store_const", const=False)
    x.add_argument("--now", action="store_true", help="synchronise the members now")
    g.add_argument("--pin-file", metavar="FILE",
                   help="with --now: read the user PIN from FILE (default: $HASHIM_PIN, or "
                        "a prompt)")
    g.set_defaults(func=cmd_group_synchronize)

    g = _sub(gsp, "ha-only", "show only the HA slot (--enable) or members' slots too")
    x = g.add_mutually_exclusive_group(required=True)
    x.add_argument("--enable", dest="state", action="store_const", const=True)
    x.add_argument("--disable", dest="state", action="store_const", const=False)
    g.set_defaults(func=cmd_group_ha_only)

    g = _sub(gsp, "set", "set a [group] key", description="Set a [group] key. Keys: "
             + ", ".join(cfg.GROUP_KEYS) + ". Booleans: true/false; recovery_attempts: "
             "a number >= 3 or unlimited.")
    g.add_argument("key", metavar="KEY")
    g.add_argument("value", metavar="VALUE")
    g.set_defaults(func=cmd_group_set)

    g = _sub(gsp, "unset", "remove a [group] key (back to its default)")
    g.add_argument("key", metavar="KEY")
    g.set_defaults(func=cmd_group_unset)

    for name in PLUGINS:
        sp.choices[name].set_defaults(plugin=name)
    return top, plug


def _selected_command(argv: Sequence[str]) -> str | None:
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return argv[i + 1] if i + 1 < len(argv) else None
        if a == "--config":
            i += 2
            continue
        if not a.startswith("-"):
            return a
        i += 1
    return None


def _plugin_function(command: str):
    """The plugin's function, or None when its module is not in this build."""
    modname, fname = PLUGINS[command]
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and (modname == e.name or modname.startswith(e.name + ".")):
            return None
        raise
    return getattr(mod, fname, None)


def _plugin_add_arguments(command: str, parsers: dict[str, argparse.ArgumentParser]) -> None:
    modname, _ = PLUGINS[command]
    try:
        mod = importlib.import_module(modname)
    except Exception:
        return          # reported when the command runs
    hook = getattr(mod, "add_arguments", None)
    if hook is None:
        return
    for name, p in parsers.items():
        if name == command or name.startswith(command + " "):
            hook(name, p)


# --------------------------------------------------------------------------- helpers

def config_path(args: argparse.Namespace) -> str:
    return cfg.default_path(getattr(args, "config", None))


def _mask_env(env) -> dict[str, str]:
    return {k: (MASK if SECRET_ENV.search(k) else v) for k, v in env.items()}


def _attempts(a: int | None) -> Any:
    return "unlimited" if a is None else a


def _json_bool(b: bool) -> str:
    return "true" if b else "false"


def _member_from_args(args: argparse.Namespace, file: str, check_files: bool) -> MemberConfig:
    env: dict[str, str] = {}
    for item in args.env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"--env {k or item!r}: expected K=V (e.g. --env "
                             "SOFTHSM2_CONF=/etc/hashim/a.conf)")
        if k in env:
            raise UsageError(f"--env {k}: given twice; give each variable once")
        env[k] = v
    d: dict[str, Any] = {"name": args.name, "module": os.path.abspath(args.module)}
    if args.token_label is not None:
        d["token_label"] = args.token_label
    if args.token_serial is not None:
        d["token_serial"] = args.token_serial
    if args.private_instance:
        d["private_instance"] = True
    if args.isolate:
        d["isolate"] = True
    if env:
        d["env"] = env
    return cfg.member_from_dict(d, file=file, check_files=check_files)


def _load_existing(path: str) -> cfg.Config | None:
    """The current config (modules not checked), or None when the file does not exist."""
    if not os.path.exists(path):
        return None
    return cfg.load(path, check_files=False)


# --------------------------------------------------------------------------- commands

def cmd_module_path(args: argparse.Namespace) -> int:
    try:
        import shim
        fn = getattr(shim, "module_path")
    except (ImportError, AttributeError):
        raise OperationFailed("module-path is not available in this build") from None
    try:
        path = fn()
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise OperationFailed(f"module-path: {e}") from None
    print(path)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    path = cfg.default_path(args.file or getattr(args, "config", None))
    c = cfg.load(path, check_files=True)
    names = ", ".join(c.member_names)
    print(f"ok: {c.path}: group '{c.group.label}', {len(c.members)} members ({names})")
    return 0


def group_dict(c: cfg.Config) -> dict[str, Any]:
    """``hashim group show --json`` (env values of secret-looking names masked)."""
    g = c.group
    return {
        "config": c.path,
        "group": {
            "label": g.label, "slot_id": g.slot_id, "serial": g.serial,
            "ha_only": g.ha_only, "synchronize": g.synchronize,
            "command_timeout": g.command_timeout, "heartbeat_interval": g.heartbeat_interval,
            "recovery_interval": g.recovery_interval,
            "recovery_attempts": _attempts(g.recovery_attempts),
            "log": g.log, "state_dir": g.state_dir,
        },
        "primary_candidate": c.members[0].name if c.members else None,
        "members": [
            {"name": m.name, "module": m.module, "token_label": m.token_label,
             "token_serial": m.token_serial, "private_instance": m.private_instance,
             "isolate": m.isolate, "env": _mask_env(m.env)}
            for m in c.members],
    }


def cmd_group_show(args: argparse.Namespace) -> int:
    c = cfg.load(config_path(args), check_files=False)
    if args.json:
        print(json.dumps(group_dict(c), indent=2))
        return 0
    g = c.group
    out = [
        f"config:            {c.path}",
        f"group:             '{g.label}'  slot {g.slot_id}  serial {g.serial}",
        f"primary candidate: {c.members[0].name}",
        f"ha_only = {_json_bool(g.ha_only)}  synchronize = {_json_bool(g.synchronize)}",
        f"command_timeout = {g.command_timeout:g} s  heartbeat_interval = "
        f"{g.heartbeat_interval:g} s",
        f"recovery_interval = {g.recovery_interval:g} s  recovery_attempts = "
        f"{_attempts(g.recovery_attempts)}",
        f"log = {g.log or '(none)'}",
        f"state_dir = {g.state_dir}",
        f"members ({len(c.members)}, in priority order):",
    ]
    for i, m in enumerate(c.members, 1):
        tok = (f"token_label '{m.token_label}'" if m.token_label is not None
               else f"token_serial '{m.token_serial}'")
        flags = [f for f, on in (("private_instance", m.private_instance),
                                 ("isolate", m.isolate)) if on]
        out.append(f"  {i}. {m.name}  {tok}  {m.module}"
                   + ("  " + " ".join(flags) if flags else ""))
        for k, v in _mask_env(m.env).items():
            out.append(f"       env {k}={v}")
    print("\n".join(out))
    return 0


def cmd_group_add_member(args: argparse.Namespace) -> int:
    path = config_path(args)
    current = _load_existing(path)
    if current is not None and args.name in current.member_names:
        raise UsageError(f"member '{args.name}' already exists in {path}; choose another "
                         "name, or remove it first (hashim group remove-member "
                         f"{args.name})")
    member = _member_from_args(args, path, check_files=not args.no_check)
    if not args.no_check:
        problems = [" ".join(str(p).split()) for p in check_new_member(member)]
        if problems:
            raise OperationFailed(f"member '{member.name}' not added: " + "; ".join(problems)
                                  + " (fix it, or add it anyway with --no-check)")

    def fn(doc):
        aot = cfg._members_aot(doc, create=False)
        if aot is not None and any(t.get("name") == member.name for t in aot):
            raise ConfigError("already exists", "choose another name or remove it first",
                              where=f"member '{member.name}'")
        if "group" not in doc:
            cfg.set_group_key(doc, "label", cfg.GroupConfig.label)
        cfg.add_member(doc, member)

    c = cfg.edit(path, fn, create=True,
                 check_files={member.name} if not args.no_check else False)
    print(f"added member '{member.name}' to group '{c.group.label}' in {c.path} "
          f"(position {len(c.members)} of {len(c.members)})")
    return 0


def cmd_group_remove_member(args: argparse.Namespace) -> int:
    path = config_path(args)
    name = args.name

    def fn(doc):
        aot = cfg._members_aot(doc, create=False)
        names = [t.get("name") for t in aot] if aot is not None else []
        if name not in names:
            raise UsageError(f"no member '{name}' in {path}; members are: "
                             + (", ".join(str(n) for n in names) or "(none)"))
        if len(names) == 1:
            raise ConfigError(f"'{name}' is the last member and a group needs at least one",
                              f"add the new member first, then remove '{name}'",
                              where=f"member '{name}'")
        cfg.remove_member(doc, name)

    c = cfg.edit(path, fn)
    print(f"removed member '{name}' from group '{c.group.label}' in {c.path}; members: "
          + ", ".join(c.member_names))
    return 0


def _set_bool(args: argparse.Namespace, key: str) -> int:
    c = cfg.edit(config_path(args), lambda doc: cfg.set_group_key(doc, key, args.state))
    print(f"{key} = {_json_bool(args.state)} in group '{c.group.label}' ({c.path})")
    return 0


def cmd_group_synchronize(args: argparse.Namespace) -> int:
    if args.now:
        from .sync import main as sync_now     # copies missing objects, prints what it did
        return sync_now(args)
    if getattr(args, "pin_file", None):
        raise UsageError("--pin-file goes with --now (--enable/--disable only edit the "
                         "config file)")
    return _set_bool(args, "synchronize")


def cmd_group_ha_only(args: argparse.Namespace) -> int:
    return _set_bool(args, "ha_only")


def cmd_group_set(args: argparse.Namespace) -> int:
    path = config_path(args)
    value = cfg.parse_group_value(args.key, args.value, file=path)
    c = cfg.edit(path, lambda doc: cfg.set_group_key(doc, args.key, value))
    shown = getattr(c.group, args.key)
    if args.key == "recovery_attempts":
        shown = _attempts(shown)
    elif isinstance(shown, bool):
        shown = _json_bool(shown)
    print(f"{args.key} = {shown} in group '{c.group.label}' ({c.path})")
    return 0


def cmd_group_unset(args: argparse.Namespace) -> int:
    path = config_path(args)
    if args.key not in cfg.GROUP_KEYS:
        cfg.parse_group_value(args.key, "", file=path)   # raises with a suggestion
    removed = []
    c = cfg.edit(path, lambda doc: removed.append(cfg.unset_group_key(doc, args.key)))
    shown = getattr(c.group, args.key)
    if args.key == "recovery_attempts":
        shown = _attempts(shown)
    what = "removed" if removed and removed[0] else "was not set"
    print(f"{args.key} {what}; now {shown} (default) in group '{c.group.label}' ({c.path})")
    return 0


def run_plugin(args: argparse.Namespace) -> int:
    name = args.plugin
    try:
        fn = _plugin_function(name)
    except Exception as e:  # noqa: BLE001 - a broken module, reported as one line
        if os.environ.get("HASHIM_DEBUG"):
            raise
        raise OperationFailed(f"{name}: cannot load {PLUGINS[name][0]}: "
                              f"{type(e).__name__}: {e}") from None
    if fn is None:
        raise OperationFailed(f"{name} is not available in this build")
    rc = fn(args)
    return 0 if rc is None else int(rc)


# --------------------------------------------------------------------------- main

def _err(msg: str) -> None:
    msg = " ".join(str(msg).split())
    try:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, plugin_parsers = build_parser()
        cmd = _selected_command(argv)
        if cmd in PLUGINS:
            _plugin_add_arguments(cmd, plugin_parsers)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.error("a command is required")
        args.config_path = config_path(args)
        if getattr(args, "plugin", None):
            return run_plugin(args)
        return args.func(args)
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        _err(code)
        return 1
    except ConfigError as e:
        _err(f"{PROG}: {e}")
        return 2
    except UsageError as e:
        _err(f"{PROG}: {e}")
        return 2
    except OperationFailed as e:
        _err(f"{PROG}: {e}")
        return 1
    except KeyboardInterrupt:
        _err(f"{PROG}: interrupted")
        return 130
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 1
    except Exception as e:  # noqa: BLE001 - never a traceback unless asked for
        if os.environ.get("HASHIM_DEBUG"):
            raise
        _err(f"{PROG}: internal error: {type(e).__name__}: {e} "
             "(set HASHIM_DEBUG=1 for a traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
