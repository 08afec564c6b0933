"""uvicorn's h11 protocol with a deadline on each request's headers. uvicorn closes a keep-alive
connection that stays idle after a response, but waits without limit for the first request of
a connection, and for headers that trickle in a byte at a time (any byte resets its keep-alive
timer): such sockets would hold --max_connections slots for as long as a client likes. Here a
connection whose next request has not fully arrived (headers) `timeout_keep_alive` seconds after
it opened, or after its previous response, is closed.

Over --max_connections uvicorn answers 503 with its own plain-text body; here the refusal is JSON
with Retry-After like every other refusal of the service (`answer_connections_full`)."""
import json

from uvicorn.protocols.http import h11_impl
from uvicorn.protocols.http.h11_impl import H11Protocol

CONNECTIONS_FULL = {"error": "overloaded: --max_connections connections are open; send again later"}


def answer_connections_full(retry_after_s):
    """Make uvicorn's h11 protocol answer a request over its concurrency limit with the service's
    JSON refusal. uvicorn (0.55, h11_impl.py) picks the ASGI app `service_unavailable` from the
    module's globals for such a request, so the module global is what is replaced; it is read per
    request and concerns only this process's h11 connections."""
    body = json.dumps(CONNECTIONS_FULL).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", str(retry_after_s).encode()), (b"connection", b"close")]

    async def connections_full(scope, receive, send):
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    h11_impl.service_unavailable = connections_full


class HeadersDeadlineProtocol(H11Protocol):
    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm_headers_deadline()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm_headers_deadline()

    def _arm_headers_deadline(self):
        self.loop.call_later(self.timeout_keep_alive, self._headers_deadline, self.cycle)

    def _headers_deadline(self, cycle_then):
        """Close unless a request began since the deadline was set, or one is still being answered."""
        waiting = self.cycle is cycle_then and (self.cycle is None or self.cycle.response_complete)
        if waiting and not self.transport.is_closing():
            self.transport.close()
