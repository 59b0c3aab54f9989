"""
The forward-proxy listener (L{listener}): absolute-form and header-routed
requests (L{request}) and CONNECT tunnels (L{tunnel}), on the shared client
connection of L{mydataproxy.server}.  Who may go where is asked of
L{mydataproxy.pipeline}.

May import every layer below it; nothing imports it but the service.
"""
