"""
TLS from the key stores users have: JKS, JCEKS, PKCS#12 and PEM
(L{keystore}), server and origin contexts behind holders that reloads swap,
and the checks on an origin's certificate (L{contexts}), and the TLS
listener that refuses before the handshake and logs failed ones
(L{listener}).

May import L{mydataproxy.egress}, L{mydataproxy.http} and
L{mydataproxy.config}.
"""
