"""Package discovery for setuptools (the rest of the metadata is in pyproject.toml).

The repository's ``configs/`` folder ships inside the wheel as ``lightning_bayes/configs`` (see
``lightning_bayes/bundled_configs.py``); pyproject.toml's ``packages.find`` cannot map a folder from outside the
package, so discovery lives here.
"""

from setuptools import find_namespace_packages, find_packages, setup

CONFIGS = ["lightning_bayes.configs", *(f"lightning_bayes.configs.{name}" for name in find_namespace_packages("configs"))]

setup(
    packages=[*find_packages(include=["lightning_bayes*"]), *CONFIGS],
    package_dir={"lightning_bayes.configs": "configs"},
    package_data={"lightning_bayes": ["py.typed"], **{name: ["*.yaml"] for name in CONFIGS}},
)
