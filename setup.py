"""The one compiled part: relay/_native.c (the splice path's accept, connect and relay).

Optional: where no C compiler or Python headers are found, the build goes on without it and
the forwarder keeps to its Python relays (relay/native.py says which rules take the C path).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "portfwd.relay._native",
            ["src/portfwd/relay/_native.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
