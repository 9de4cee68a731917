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

# Cython finds a module's own .pxd (ext/_stream.pxd) by its dotted name, i.e. at
# corral/ext/_stream.pxd under an include directory; corral.ext lives in ext/, so give
# Cython a directory where corral/ext leads there.
PXD_ROOT = HERE / "build" / "cython-include"
(PXD_ROOT / "corral").mkdir(parents=True, exist_ok=True)
if (PXD_ROOT / "corral" / "ext").is_symlink():
    (PXD_ROOT / "corral" / "ext").unlink()
(PXD_ROOT / "corral" / "ext").symlink_to(HERE / "ext", target_is_directory=True)
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
        # First without a C library (x86-64, arm64: no start-up work at each sandbox start,
        # see the source), then static, then dynamic; CORRAL_INIT_DYNAMIC: only the last.
        attempts = [] if os.environ.get("CORRAL_INIT_DYNAMIC") else [
            ["-DCORRAL_INIT_FREESTANDING", "-ffreestanding", "-fno-stack-protector",
             "-fno-pie", "-no-pie", "-nostdlib", "-static"],
            ["-static"]]
        for flags in [*attempts, []]:
            command = [cc, "-O2", "-Wall", "-Werror", *flags, "-o", target, source]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode == 0:
                return
        raise RuntimeError(f"cannot build corral-init: {' '.join(command)}\n{done.stderr}")


setup(
    cmdclass={"build_ext": BuildExtAndInit},
    ext_modules=cythonize(
        EXTENSIONS,
        include_path=[str(PXD_ROOT)],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
