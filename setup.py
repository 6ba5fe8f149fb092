"""The one compiled part: `gateway._check` (docs/internals.md "The compiled check").

Everything else is in pyproject.toml. The extension is optional: where it cannot be built
(no C compiler), the install goes on and `check_batch` runs its pure-Python path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway._check",
            sources=["gateway/_check.c"],
            extra_compile_args=["-O2", "-std=c99", "-Wall", "-Wextra"],
            optional=True,
        ),
        Extension("gateway._window", sources=["gateway/_window.c"], extra_compile_args=["-O2", "-std=c99", "-Wall", "-Wextra"], optional=True),
    ]
)
