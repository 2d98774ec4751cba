"""Builds the PKCS#11 module (native/build_stub.py, cffi embedding) into
shim/libhashim.so as part of every install, editable ones included."""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildModule(build_ext):
    """Compile the cffi-embedding stub; the product is a plain shared library,
    placed at shim/libhashim.so (in place for editable installs)."""

    def run(self):
        sys.path.insert(0, os.path.join(HERE, "native"))
        import build_stub
        tmp = os.path.join(self.build_temp, "hashim-stub")
        os.makedirs(tmp, exist_ok=True)
        so = build_stub.make_builder().compile(tmpdir=tmp, target="libhashim.so")
        dests = [os.path.join(HERE, "shim")] if self.inplace else \
            [os.path.join(self.build_lib, "shim")]
        for d in dests:
            os.makedirs(d, exist_ok=True)
            self.copy_file(so, os.path.join(d, "libhashim.so"))

    def get_outputs(self):
        return [os.path.join(self.build_lib, "shim", "libhashim.so")]

    def get_output_mapping(self):
        return {os.path.join(self.build_lib, "shim", "libhashim.so"):
                os.path.join(HERE, "shim", "libhashim.so")}


setup(ext_modules=[Extension("shim._libhashim_placeholder", sources=[])],
      cmdclass={"build_ext": BuildModule})
