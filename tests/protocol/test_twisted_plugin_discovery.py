"""``plugin:<name>`` finds an extension through Twisted's plugin system (twisted/plugins/*.py
in any sys.path entry), in a fresh interpreter as a deployment would."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = textwrap.dedent('''
    from twisted.plugin import IPlugin
    from zope.interface import implementer

    from kotlin_smtp_py.plugins import ICommandInterceptor, PROCEED, Stage


    @implementer(IPlugin, ICommandInterceptor)
    class _Audit:
        name = "example-audit"
        stages = (Stage.PRE_COMMAND,)
        order = 5

        def intercept(self, context):
            return PROCEED


    exampleAudit = _Audit()
''')


def test_interceptor_discovered_as_a_twisted_plugin(tmp_path: Path) -> None:
    plugins = tmp_path / "site" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "kotlin_smtp_example.py").write_text(PLUGIN)
    code = ("from kotlin_smtp_py.plugins import ICommandInterceptor, load_plugin\n"
            "p = load_plugin('plugin:example-audit', ICommandInterceptor)\n"
            "print(type(p).__name__, p.order)\n"
            "try:\n"
            "    load_plugin('plugin:missing', ICommandInterceptor)\n"
            "except LookupError as e:\n"
            "    print('missing:', e)\n")
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(repo)]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "_Audit 5"
    assert "missing: no Twisted plugin named 'missing'" in out.stdout
