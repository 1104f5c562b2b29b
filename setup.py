"""Install kotlin-smtp-py.

The twistd plugin lives in ``twisted/plugins/kotlin_smtp_plugin.py``. ``twisted`` and
``twisted.plugins`` must stay namespace directories (no ``__init__.py``), so the plugin
directory is listed explicitly here instead of being discovered.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["kotlin_smtp_py", "kotlin_smtp_py.*"]) + ["twisted.plugins"],
    package_data={
        "twisted.plugins": ["kotlin_smtp_plugin.py"],
        "kotlin_smtp_py": ["py.typed", "default-config.yaml"],
    },
)
