"""
Operating the daemon: the access log and its writer thread (L{logs}).

May import L{mydataproxy.config}.
"""
