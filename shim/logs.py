"""The HA log: transitions and refusals with their reasons, never a PIN or key
material. Written to [group] log (when set) and errors also to stderr."""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("hashim")
_configured = None


def setup_logging(config):
    global _configured
    path = config.group.log
    if _configured == path:
        return
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s",
                            "%Y-%m-%dT%H:%M:%S")
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(os.environ.get("HASHIM_STDERR_LEVEL", "ERROR").upper())
    err.setFormatter(logging.Formatter("hashim: %(message)s"))
    log.addHandler(err)
    if path:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fh = logging.FileHandler(path)
            fh.setFormatter(fmt)
            log.addHandler(fh)
        except OSError as e:
            log.error("cannot write the HA log %s: %s", path, e)
    _configured = path
