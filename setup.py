"""Maps the import names onto the repository's folders.

``outrider`` lives in ``core/`` and ``outrider.extensions`` in ``extensions/``
(see DESIGN.md); every sub-package below them is found automatically, so a new
extension folder needs no packaging change beyond its entry point.

The http1 codec's C accelerator is optional: without a compiler (or Python
headers) the build goes on and the pure-Python code runs instead.
"""

from setuptools import Extension, find_packages, setup


def _packages(prefix: str, folder: str) -> list[str]:
    return [prefix] + [f"{prefix}.{name}" for name in find_packages(folder)]


setup(
    packages=_packages("outrider", "core") + _packages("outrider.extensions", "extensions"),
    package_dir={"outrider": "core", "outrider.extensions": "extensions"},
    ext_modules=[
        Extension(
            "outrider.extensions.codecs.http1._speedups",
            ["extensions/codecs/http1/_speedups.c"],
            optional=True,
        )
    ],
)
