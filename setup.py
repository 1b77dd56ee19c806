"""Maps the import names onto the repository's folders.

``outrider`` lives in ``core/`` and ``outrider.extensions`` in ``extensions/``
(see DESIGN.md); every sub-package below them is found automatically, so a new
extension folder needs no packaging change beyond its entry point.
"""

from setuptools import find_packages, setup


def _packages(prefix: str, folder: str) -> list[str]:
    return [prefix] + [f"{prefix}.{name}" for name in find_packages(folder)]


setup(
    packages=_packages("outrider", "core") + _packages("outrider.extensions", "extensions"),
    package_dir={"outrider": "core", "outrider.extensions": "extensions"},
)
