"""
Operating the daemon: the access and error logs and their writer threads
(L{logs}), rotating files (L{logfile}), the tamper-evident chain
(L{audit}), the metrics (L{metrics}) and the admin site (L{admin}).

May import L{mydataproxy.config}, L{mydataproxy.http} and the layers below
L{mydataproxy.ops} (egress, tls, upstream) for the shapes it reports on.
"""
