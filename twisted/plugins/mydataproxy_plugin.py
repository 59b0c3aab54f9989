"""twistd plugin: C{twistd -n mydataproxy [--config FILE]}."""

import os

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "Config file: native TOML, or the Java product's application.properties."],
    ]

    def postOptions(self) -> None:
        from mydataproxy import config, material
        from mydataproxy.ops import reloadstatus

        try:
            settings = config.load(self["config"]) if self["config"] else config.Settings()
            # The stores and the htpasswd file: refused here, in one line, too.
            self["material"] = material.loadMaterial(settings)
        except config.ConfigError as e:
            # One line that names file, key and problem: a UsageError would
            # have twistd print its whole option summary above it.
            raise SystemExit(f"mydataproxy: {e}") from None
        directory = settings.logging.directory
        if directory:
            # Here, before twistd's own logging starts: a failure is one line.
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as e:
                raise SystemExit(f"mydataproxy: logging.directory: cannot create {directory}: {e.strerror}") from None
        self["settings"] = settings
        # twistd's own --pidfile: the reload status is written beside it.
        pidfile = self.parent["pidfile"] if self.parent is not None else ""
        self["status"] = reloadstatus.statusPath(os.path.abspath(pidfile)) if pidfile else None


@implementer(IServiceMaker, IPlugin)
class MyDataProxyServiceMaker:
    tapname = "mydataproxy"
    description = "MyData Proxy: forward proxy (absolute-form, x-target-host, CONNECT) for MyData traffic."
    options = Options

    def makeService(self, options: Options):
        settings = options["settings"]
        if settings.daemon.workers > 1:
            from mydataproxy.workers import makeSupervisor

            return makeSupervisor(settings, options["config"], options["status"])
        from mydataproxy.service import makeService

        return makeService(options["settings"], options["material"], statusPath=options["status"])


serviceMaker = MyDataProxyServiceMaker()
