"""uvicorn's h11 protocol with a deadline on each request's headers. uvicorn closes a keep-alive
connection that stays idle after a response, but waits without limit for the first request of
a connection, and for headers that trickle in a byte at a time (any byte resets its keep-alive
timer): such sockets would hold --max_connections slots for as long as a client likes. Here a
connection whose next request has not fully arrived (headers) `timeout_keep_alive` seconds after
it opened, or after its previous response, is closed."""
from uvicorn.protocols.http.h11_impl import H11Protocol


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
