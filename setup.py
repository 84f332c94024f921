"""Build of xentfast's optional Cython + OpenMP extension, ``xentfast.backends._cython``.

All package metadata lives in pyproject.toml; this file only declares the extension and
how to build it.  The extension is optional: xentfast works without it (backends
``cpu``/``numpy``), so when Cython, a C compiler or OpenMP is missing, or the compile
fails, the install goes on with a warning and ``xentfast.available_backends()`` simply
lacks ``"cython"``.  Set ``XENTFAST_REQUIRE_CYTHON=1`` to make any of that an error
(CI does, to prove the extension really builds; and to see why it did not).

Flags (gcc/clang): -O3, OpenMP (-fopenmp; without it, with a warning, the kernels run
on one thread), -ffp-contract=fast (FMA where the CPU has it, i.e. in the AVX2/AVX-512
target_clones of _xfrows.h).  Never -ffast-math (NaN/inf are part of the contract),
never -fno-trapping-math (gcc 12.2 miscompiles a masked reduction under it; see
benchmarks/NOTES_cython_kernels.md) and never -march=native (wheels must run on any
x86-64: the clones pick AVX2/AVX-512 at load time instead).  MSVC: /O2 /openmp.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import textwrap
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXT_NAME = "xentfast.backends._cython"
PYX = os.path.join("xentfast", "backends", "_cython.pyx")
HEADERS = [
    os.path.join("xentfast", "backends", name)
    for name in ("_fastexp.h", "_xfrows.h", "_xfrows_tmpl.h")
]
# Tempita templates (Cython.Tempita, as NumPy/SciPy/pandas): rendered next to themselves
# without the ".in" before cythonize, on every build (sdist -> wheel included); the
# rendered files are build outputs, never edited or committed.
TEMPLATES = [os.path.join("xentfast", "backends", "_cython_kernels.pxi.in")]


def _render_templates() -> None:
    from Cython import Tempita

    for src in TEMPLATES:
        dst = src[: -len(".in")]
        with open(src, encoding="utf-8") as f:
            text = (
                f"# GENERATED from {os.path.basename(src)} by setup.py (Cython.Tempita): "
                "edit the template, not this file.\n" + Tempita.sub(f.read())
            )
        old = None
        if os.path.exists(dst):
            with open(dst, encoding="utf-8") as f:
                old = f.read()
        if text != old:  # rewrite only on change: cythonize goes by modification times
            with open(dst, "w", encoding="utf-8") as f:
                f.write(text)


def _required() -> bool:
    return os.environ.get("XENTFAST_REQUIRE_CYTHON", "").strip().lower() not in (
        "", "0", "false", "no", "off",
    )


def _warn(message: str) -> None:
    text = "xentfast: " + message
    # pip hides a build's stdout unless -v; stderr and warnings are shown on failure only,
    # so say it in every place a user may look.
    warnings.warn(text, RuntimeWarning, stacklevel=2)
    sys.stderr.write("\n" + "*" * 78 + "\n" + textwrap.fill(text, 78) + "\n" + "*" * 78 + "\n")


class OptionalBuildExt(build_ext):
    """build_ext that cythonizes late and treats every failure as 'no extension'."""

    _cython_error: BaseException | None = None

    def finalize_options(self):
        # cythonize (.pyx -> .c) before setuptools' finalize_options, which annotates the
        # Extension objects that cythonize returns.
        try:
            self.distribution.ext_modules = self._cythonize(self.distribution.ext_modules)
        except Exception as exc:  # noqa: BLE001 - any failure means "no extension"
            self._cython_error = exc
            self.distribution.ext_modules = []
        super().finalize_options()

    def run(self):
        if self._cython_error is not None:
            self._give_up(self._cython_error)
            return
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001
            self._give_up(exc)

    @staticmethod
    def _cythonize(extensions):
        if not extensions:
            return extensions
        try:
            from Cython.Build import cythonize
        except ImportError as exc:
            raise RuntimeError("Cython>=3.0 is not installed") from exc
        _render_templates()
        return cythonize(extensions, compiler_directives={"language_level": 3}, quiet=True)

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            compile_args, link_args = ["/O2", "/openmp"], []
        else:
            compile_args = ["-O3", "-ffp-contract=fast"]
            link_args = []
            if self._has_openmp():
                compile_args.append("-fopenmp")
                link_args.append("-fopenmp")
            else:
                _warn(
                    "the C compiler has no usable OpenMP (-fopenmp); the Cython backend is "
                    "built single-threaded. On macOS: `brew install libomp` and build with "
                    "CC=gcc-14 (or an OpenMP-enabled clang)."
                )
        try:
            import numpy
        except ImportError:
            numpy = None
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + compile_args
            ext.extra_link_args = list(ext.extra_link_args or []) + link_args
            if numpy is not None:
                ext.include_dirs.append(numpy.get_include())
        super().build_extensions()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._give_up(exc, ext)

    def _has_openmp(self) -> bool:
        """Compile and link a tiny OpenMP program with the compiler setuptools chose."""
        tmp = tempfile.mkdtemp(prefix="xentfast-omp-")
        try:
            src = os.path.join(tmp, "omp_check.c")
            with open(src, "w") as f:
                f.write(
                    "#include <omp.h>\n"
                    "int main(void) { int n = 0;\n"
                    "#pragma omp parallel reduction(+:n)\n"
                    "n += 1; return omp_get_max_threads() > 0 && n > 0 ? 0 : 1; }\n"
                )
            objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
            self.compiler.link_executable(
                objs, os.path.join(tmp, "omp_check"), extra_postargs=["-fopenmp"]
            )
            return True
        except Exception:  # noqa: BLE001
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _give_up(self, exc: BaseException, ext: Extension | None = None) -> None:
        # Forget the failed extension(s): editable installs and bdist_wheel ask
        # get_outputs() for the built files and must not look for a missing .so.
        self.extensions = [e for e in self.extensions if ext is not None and e is not ext]
        if _required():
            raise RuntimeError(
                f"XENTFAST_REQUIRE_CYTHON is set and the Cython extension {EXT_NAME} could "
                f"not be built: {exc}"
            ) from exc
        _warn(
            f"building the optional Cython extension {EXT_NAME} failed ({type(exc).__name__}: "
            f"{exc}). xentfast is installed without it: the 'cython' backend is "
            "unavailable and the others (cpu/numpy) are used. Install a C compiler, "
            "Cython>=3.0 and NumPy, then reinstall; XENTFAST_REQUIRE_CYTHON=1 makes this "
            "an error."
        )


setup(
    ext_modules=[
        Extension(
            EXT_NAME,
            sources=[PYX],
            depends=HEADERS + TEMPLATES,
            include_dirs=[os.path.join("xentfast", "backends")],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
