"""
/readyz's reasons, from the service itself: a listener that is not
listening, and draining.  (The admin site's answers are in test_admin.py.)
"""

from __future__ import annotations

from conftest import LOOPBACK, get_free_port
from mydataproxy.config import ForwardSettings, Settings
from mydataproxy.service import makeService


def test_aListenerNotListeningAndDrainingAreReasons() -> None:
    """The service is built, not started: its listener has no port yet."""
    port = get_free_port()
    settings = Settings(forward=ForwardSettings(listen=f"tcp:{port}:interface={LOOPBACK}"))
    service = makeService(settings)
    assert service.notReady() == [f"forward is not listening on tcp:{port}:interface={LOOPBACK}"]
    service.draining = True
    assert "draining (shutting down)" in service.notReady()
