"""twistd plugin: ``twistd -n smtp --config FILE``. Imports are lazy so ``twistd --help`` stays
fast and a broken install shows a real traceback instead of "Unknown command: smtp"."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "YAML config file (default: the embedded development config)"],
    ]


@implementer(IServiceMaker, IPlugin)
class SmtpServiceMaker:
    tapname = "smtp"
    description = "kotlin-smtp-py mail transfer agent (ESMTP server, spool, delivery)"
    options = Options

    def makeService(self, options: Any) -> Any:
        from kotlin_smtp_py.twistd import make_service

        return make_service(options["config"])


serviceMaker = SmtpServiceMaker()
