"""Build the native parts of corral.ext; all other metadata lives in pyproject.toml.

- every ext/_*.pyx becomes an extension module (corral.ext._stream, corral.ext._spawn);
- ext/corral_init.c becomes the corral-init executable (PID 1 of each sandbox), placed
  next to the extension modules.
"""

import os
import subprocess
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
EXTENSIONS = [
    Extension(f"corral.ext.{pyx.stem}", [f"ext/{pyx.name}"], extra_compile_args=["-O2"])
    for pyx in sorted((HERE / "ext").glob("_*.pyx"))
]


class BuildExtAndInit(build_ext):
    """build_ext that also compiles corral-init into the package directory."""

    def run(self):
        super().run()
        out_dir = os.path.dirname(self.get_ext_fullpath("corral.ext._spawn"))
        os.makedirs(out_dir, exist_ok=True)
        target = os.path.join(out_dir, "corral-init")
        source = str(HERE / "ext" / "corral_init.c")
        if os.path.exists(target) and os.path.getmtime(target) >= os.path.getmtime(source):
            return
        cc = os.environ.get("CC", "cc")
        subprocess.check_call([cc, "-O2", "-Wall", "-Werror", "-o", target, source])


setup(
    cmdclass={"build_ext": BuildExtAndInit},
    ext_modules=cythonize(
        EXTENSIONS,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
