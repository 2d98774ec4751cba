"""hashim: a high-availability PKCS#11 module (one virtual HA slot over a group of
real tokens). The module file is ``libhashim.so`` next to this package."""
import os

__version__ = "0.1.0"


def module_path() -> str:
    """Absolute path of the built PKCS#11 module."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "libhashim.so")
