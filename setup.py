"""The compiled parts, each an accelerator of a pure-Python path (docs/internals.md):
`gateway._check` (the common batch's check, and Redis mode's split), `gateway._route` (a
record's ledger hits taken into their actors), `gateway._window` (the dedupe window's loops).

Everything else is in pyproject.toml. Each extension is optional: where it cannot be built
(no C compiler), the install goes on and the pure-Python path runs, with the same outcome.
"""

from setuptools import Extension, setup


def compiled(name: str) -> Extension:
    return Extension(
        f"gateway.{name}",
        sources=[f"gateway/{name}.c"],
        extra_compile_args=["-O2", "-std=c99", "-Wall", "-Wextra"],
        optional=True,
    )


setup(ext_modules=[compiled("_check"), compiled("_route"), compiled("_window")])
