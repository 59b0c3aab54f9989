"""
One forward-proxy request: its target parsed from the request (absolute
form or C{x-target-host}), admitted by the listener's
L{mydataproxy.pipeline.RequestPipeline}, sent to its origin with the
forward side's header rules and Max-Forwards.  The relaying itself is
L{mydataproxy.server.request.ProxiedRequest}'s.
"""

from __future__ import annotations

from twisted.python.failure import Failure

from mydataproxy.http import headers as rules
from mydataproxy.http.target import Refusal, parseTarget
from mydataproxy.server.request import ClientBodyThrottle, ProxiedRequest
from mydataproxy.upstream.client import UpstreamExchange

# Never reflected by a TRACE the proxy answers itself.
_SECRET_FIELDS = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


class ForwardRequest(ProxiedRequest):
    """A request to the forward listener: absolute-form or header-routed."""

    __slots__ = ()

    # Admission

    def start(self) -> None:
        """The head is complete: admit the request and start relaying."""
        proxy = self.proxy
        pipeline = proxy.pipeline
        head = self.head
        limit = proxy.limits.max_body_bytes
        self.clientIP = pipeline.clientOf(self.channel.clientAddress(), head.values(b"x-forwarded-for"))
        try:
            pipeline.admitClient(self.clientIP)
            self.target = parseTarget(head.method, head.target, head.values(b"x-target-host"))
            pipeline.checkTarget(self.target)
            if limit and head.contentLength is not None and head.contentLength > limit:
                raise Refusal(413, "request body too large", "limits.max_body_bytes")
            maxForwards = self._maxForwards()
        except Refusal as refusal:
            self.refuseFor(refusal)
            return
        if maxForwards == 0:
            self._answerAsFinalRecipient()
            return
        self._exchange = UpstreamExchange(
            proxy.pool,
            self._upstreamHead(maxForwards),
            self._frameBody(),
            method=head.method,
            receiver=self,
            bodyProducer=ClientBodyThrottle(self.channel),
        )
        certificate = self.channel.clientCertificate()
        try:
            # The common case, decided on the spot: no Deferred round trip.
            destination = pipeline.decideNow(self.target, certificate)
        except Refusal as refusal:
            self._routeFailed(Failure(refusal))
            return
        if destination is not None:
            self._routed(destination)
            return
        d = pipeline.admit(head.values(b"proxy-authorization"), self.target, certificate, self.clientIP)
        d.addCallback(self._routed)
        d.addErrback(self._routeFailed)

    def _maxForwards(self) -> int | None:
        """
        The C{Max-Forwards} value of an OPTIONS or TRACE request (RFC 9110
        7.6.2), or L{None}.
        """
        values = self.head.values(b"max-forwards")
        if values is None or self.head.method not in rules.MAX_FORWARDS_METHODS:
            return None
        if len(values) != 1 or not values[0].isdigit() or not values[0].isascii():
            raise Refusal(400, "invalid Max-Forwards")
        return int(values[0])

    def _answerAsFinalRecipient(self) -> None:
        """OPTIONS or TRACE with C{Max-Forwards: 0}: the proxy answers."""
        head = self.head
        if head.method == b"TRACE":
            lines = [b"%s %s %s" % (head.method, head.target, head.version)]
            lines.extend(b"%s: %s" % field for field in head.fields if field[0].lower() not in _SECRET_FIELDS)
            body = b"\r\n".join(lines) + b"\r\n\r\n"
            contentType = b"message/http"
        else:
            body = b""
            contentType = b"text/plain; charset=utf-8"
        self._writeOwnResponse(200, body, [(b"Content-Type", contentType)])

    def _upstreamHead(self, maxForwards: int | None) -> bytes:
        head = self.head
        fields = rules.upstreamRequestFields(
            head,
            self.proxy.settings.forward.header_filter,
            self.target.destination.authority,
            self.channel.clientAddress().encode("ascii"),
        )
        if maxForwards is not None:
            fields.append((b"Max-Forwards", b"%d" % max(0, maxForwards - 1)))
        return self._upstreamHeadBytes(self.target.path, fields)

