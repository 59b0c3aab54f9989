"""
HTTP rules, written once and free of I/O: request framing and the request
head parser (L{framing}), hop-by-hop and proxy header rules and the
proxy's own answers (L{headers}), host normalisation (L{hosts}) and
request targets (L{target}).

Imports nothing of ours: every other layer may use it.
"""
