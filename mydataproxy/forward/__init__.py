"""
The forward-proxy listener: the client connection and its requests
(L{channel}) and CONNECT tunnels (L{tunnel}).  HTTP/1.1 and sockets only:
who may go where is asked of L{mydataproxy.pipeline}.

May import every layer below it; nothing imports it but the service.
"""
