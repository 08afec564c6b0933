"""Request bodies as the service takes them: read within a deadline and a size limit, counted
against the bytes that all requests together may hold, and the image taken out of a multipart
form (`curl -F image=@part.png`) or used as sent (`curl --data-binary @part.png`)."""
import asyncio
import contextlib
from email.message import Message

from starlette.requests import ClientDisconnect

CLOSE = {"Connection": "close"}  # the rest of the body is not read: the connection cannot be reused
FORM_FIELD = "image"


class BodyRefused(Exception):
    """The body is not taken: answered with `status` (JSON error) and `headers`."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class BodyBudget:
    """Bytes of request bodies held at once over all requests, from their first byte until their
    image is decoded: what bounds their memory when many clients upload together. Counted as
    bytes arrive, not as announced, so that slow uploads hold only what they have sent. Used
    from the event loop only: no lock."""

    def __init__(self, limit):
        self.limit, self.held = limit, 0

    def take(self, count):
        if self.held + count > self.limit:
            raise BodyRefused(503, f"busy: {self.held} bytes of request bodies held, the limit is {self.limit} "
                                   f"(--max_body_buffer_mb)", {"Retry-After": "1", **CLOSE})
        self.held += count

    def give_back(self, count):
        self.held -= count


@contextlib.asynccontextmanager
async def received_body(request, max_bytes, timeout_s, budget):
    """The whole body, held against `budget` until the `async with` block ends. 413 as soon as
    it is known to exceed `max_bytes` (from Content-Length before reading any of it, else while
    it streams in); 408 when it has not all arrived `timeout_s` after the headers."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise BodyRefused(400, "bad Content-Length header", CLOSE)
        if int(length) > max_bytes:
            raise BodyRefused(413, f"body of {int(length)} bytes is over the limit of {max_bytes} bytes "
                                   f"(--max_image_mb)", CLOSE)
    chunks, held = [], 0
    try:
        try:
            async with asyncio.timeout(timeout_s):
                async for chunk in request.stream():
                    if held + len(chunk) > max_bytes:
                        raise BodyRefused(413, f"body is over the limit of {max_bytes} bytes (--max_image_mb)",
                                          CLOSE)
                    budget.take(len(chunk))
                    held += len(chunk)
                    chunks.append(chunk)
        except TimeoutError:
            raise BodyRefused(408, f"the body did not arrive within {timeout_s:g} s (--body_timeout_s)",
                              CLOSE) from None
        except ClientDisconnect:  # nobody reads the answer; a 400 rather than an internal error
            raise BodyRefused(400, "the client closed the connection before its body arrived", CLOSE) from None
        body = b"".join(chunks)
        del chunks
        yield body
    finally:
        budget.give_back(held)


def _header_param(value, param, header):
    """A parameter of a MIME header value (quoted or not), or None."""
    message = Message()
    message[header] = value
    found = message.get_param(param, header=header)
    return found if isinstance(found, str) else None


def image_bytes(body, content_type):
    """The encoded image in a request body: the `image` field of a multipart/form-data body (or
    its only file), else the body itself (a raw upload; curl --data-binary labels it
    application/x-www-form-urlencoded, which is not parsed)."""
    if not (content_type or "").lower().startswith("multipart/form-data"):
        return body
    boundary = _header_param(content_type, "boundary", "content-type")
    if not boundary:
        raise BodyRefused(400, "multipart/form-data body without a boundary")
    parts = _form_parts(body, b"--" + boundary.encode("latin-1"))
    named = [p for p in parts if p[0] == FORM_FIELD]
    files = [p for p in parts if p[1] is not None]
    chosen = named or (files if len(files) == 1 else [])
    if not chosen:
        raise BodyRefused(400, f"multipart form without an {FORM_FIELD!r} field (send the image as "
                               f"-F {FORM_FIELD}=@FILE)")
    _, _, start, end = chosen[0]
    return body[start:end]


def _form_parts(body, delimiter):
    """[(field name, file name, start, end)] of each part's content in `body` (RFC 7578): parts
    are found by offset, so only the chosen one is ever copied."""
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:  # a preamble before the first delimiter
        pos = body.find(b"\r\n" + delimiter)
        if pos < 0:
            raise BodyRefused(400, "multipart body without its boundary")
        pos += 2 + len(delimiter)
    parts = []
    while not body.startswith(b"--", pos):  # "--" after a delimiter closes the form
        line_end = body.find(b"\r\n", pos)  # the rest of the delimiter line (transport padding)
        head_end = body.find(b"\r\n\r\n", line_end) if line_end >= 0 else -1
        end = body.find(b"\r\n" + delimiter, head_end) if head_end >= 0 else -1
        if end < 0:
            raise BodyRefused(400, "multipart body cut short (a part without its headers or its end)")
        name = filename = None
        for line in body[line_end + 2:head_end].split(b"\r\n"):
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-disposition":
                disposition = value.decode("latin-1").strip()
                name = _header_param(disposition, "name", "content-disposition")
                filename = _header_param(disposition, "filename", "content-disposition")
        parts.append((name, filename, head_end + 4, end))
        pos = end + 2 + len(delimiter)
    return parts
