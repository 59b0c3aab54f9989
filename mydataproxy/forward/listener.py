"""
The forward-proxy listener: absolute-form and header-routed requests become
L{ForwardRequest}s, CONNECT requests L{Tunnel}s.

A request passes, in order: the limits on its head (414, 431, 408) and its
framing (400), in the channel (L{mydataproxy.server.channel}); the client
allow-list (403) and the rate limit (429), asked of the pipeline; target
parsing (400, 403); the port lists (403); the body limit (413); then proxy
authentication (407), name resolution (502, 504) and the egress policy on
the resolved addresses (403), all asked of the listener's
L{mydataproxy.pipeline.RequestPipeline}.
"""

from __future__ import annotations

from mydataproxy.config import Settings
from mydataproxy.forward.request import ForwardRequest
from mydataproxy.forward.tunnel import Tunnel
from mydataproxy.http.framing import RequestHead
from mydataproxy.http.target import Refusal, Target, parseTarget
from mydataproxy.ops.logs import AccessLog
from mydataproxy.pipeline import RequestPipeline
from mydataproxy.server.channel import ProxyChannel, ProxyListener
from mydataproxy.server.request import logRefusal
from mydataproxy.upstream.client import UpstreamPool


class ForwardProxy(ProxyListener):
    """Shared state of one forward listener (C{[forward]})."""

    section = "forward"
    takesConnect = True

    def __init__(
        self,
        settings: Settings,
        pipeline: RequestPipeline,
        pool: UpstreamPool,
        accessLog: AccessLog,
        reactor,
    ) -> None:
        super().__init__(settings, pipeline, pool, accessLog, reactor, settings.forward.client_idle_timeout)

    def newRequest(self, channel: ProxyChannel, head: RequestHead) -> ForwardRequest:
        return ForwardRequest(channel, head)

    def newTunnel(self, channel: ProxyChannel, head: RequestHead) -> Tunnel:
        target: Target | Refusal
        pipeline = self.pipeline
        client = pipeline.clientOf(channel.clientAddress(), head.values(b"x-forwarded-for"))
        try:
            pipeline.admitClient(client)
            target = parseTarget(head.method, head.target, None)
        except Refusal as refusal:
            logRefusal(refusal, head, client)
            target = refusal
        return Tunnel(channel, target, head.values(b"proxy-authorization"), self)
