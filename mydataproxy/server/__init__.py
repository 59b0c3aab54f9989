"""
The client side every listener shares: the HTTP/1.1 connection (L{channel}:
our own parser, back-pressure, limits, linger, the hand-over to a tunnel)
and the relayed request (L{request}: response framing towards the client,
the proxy's own answers, the access line).

Imports the pipeline and the layers below it; the listeners
(L{mydataproxy.forward}, L{mydataproxy.reverse}) build on it.
"""
