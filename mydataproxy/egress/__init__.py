"""
Who may use the proxy and where it may go: client access and destination
rules with the SSRF guard (L{policy}), per-client limits (L{limits}),
proxy authentication (L{auth}), asynchronous name resolution
(L{resolver}) and connecting to exactly the checked addresses
(L{connect}).

May import L{mydataproxy.http} and L{mydataproxy.config}.
"""
