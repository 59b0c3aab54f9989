"""
The reverse-proxy listener (L{listener}) for traffic an Apache httpd in
front hands in: routes (L{routes}), the rewrites both ways (L{rewrite}),
backends, balancing and the waiting room (L{balancer}), and the request
itself (L{request}), on the shared client connection of
L{mydataproxy.server}.

May import every layer below it; nothing imports it but the service.
"""
