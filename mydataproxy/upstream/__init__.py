"""
Requests to origins: the bounded keep-alive pool and the lean, strict
HTTP/1.1 client (L{client}).

May import L{mydataproxy.tls}, L{mydataproxy.egress}, L{mydataproxy.http}
and L{mydataproxy.config}.
"""
