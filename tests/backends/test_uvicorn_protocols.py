"""uvicorn is the minor version server/backends/uvicorn_protocols.py was checked against: it
overrides uvicorn's protocol classes and reads their state, which a new minor (uvicorn is 0.x)
may rename or rework. Another version fails here, by name, before a connection limit quietly
stops holding."""

from __future__ import annotations

import inspect

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from server.backends.uvicorn_protocols import UVICORN_CHECKED


def test_uvicorn_is_the_version_the_protocols_were_checked_against() -> None:
    assert uvicorn.__version__.rsplit(".", 1)[0] == UVICORN_CHECKED, (
        f"uvicorn {uvicorn.__version__} is installed; server/backends/uvicorn_protocols.py overrides uvicorn "
        f"{UVICORN_CHECKED}'s HttpToolsProtocol (data_received, the parser callbacks, send_400_response) and "
        "WebSocketsSansIOProtocol (conn, data_received): check them against this version, then change "
        "UVICORN_CHECKED and the range in pyproject.toml")


def test_the_internals_the_protocols_use_are_there() -> None:
    for name in ("_unset_keepalive_if_required", "_should_upgrade", "handle_websocket_upgrade",
                 "_unsupported_upgrade_warning", "send_400_response", "on_message_begin", "on_url", "on_header",
                 "on_headers_complete", "on_message_complete"):
        assert callable(getattr(HttpToolsProtocol, name, None)), f"HttpToolsProtocol.{name} is gone"
    source = inspect.getsource(HttpToolsProtocol.__init__)
    for attribute in ("self.parser", "self.cycle", "self.client", "self.loop"):
        assert attribute in source, f"HttpToolsProtocol no longer sets {attribute}"
    assert "self.response_started" in inspect.getsource(RequestResponseCycle.__init__)
    source = inspect.getsource(WebSocketsSansIOProtocol.__init__)
    assert "self.conn = ServerProtocol(" in source and "self.config" in source
