"""Read a multipart/form-data body with hard limits, streaming.

Starlette's form parser does not cap file parts (it spools them to disk), so the service
reads the body itself: it refuses a declared Content-Length over the request limit before
reading anything, counts bytes as they arrive, and stops at the first part or file over
its limit. A body must arrive in full within ``body_timeout_s`` (408 otherwise), so a
stalled upload cannot hold its connection, memory and queue slots for ever.

Files are kept in memory. :class:`UploadMemory` bounds the bytes of all request bodies
held at once in the process: a request holds its declared Content-Length *before* its
first byte is read (or, sent chunked, each chunk before it is stored), and one that does
not fit is refused at once with 503 ``upload_memory_full``. Nothing is spooled to disk:
a refused client retries, and the bound keeps the process's memory predictable.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.errors import (
    BadRequest,
    PayloadTooLarge,
    ServiceError,
    Unavailable,
    Unprocessable,
    UnsupportedMediaType,
)
from app.settings import Settings

FILES_FIELD = "files"
# Longest header line of one part (python-multipart's own check). Content-Disposition
# carries the filename, so this is also the bound on a filename's length.
MAX_PART_HEADER_BYTES = 8192


@dataclass(frozen=True)
class UploadLimits:
    max_request_bytes: int
    max_file_bytes: int
    max_files: int
    body_timeout_s: float = 60.0


def limits_from(settings: Settings) -> UploadLimits:
    """The upload limits of every route that reads a body (/v1 predict, explain, /v2 infer)."""
    return UploadLimits(
        max_request_bytes=settings.max_request_bytes,
        max_file_bytes=settings.max_file_bytes,
        max_files=settings.max_files_per_request,
        body_timeout_s=settings.body_timeout_s,
    )


@dataclass
class UploadedFile:
    filename: str
    data: bytes


class ClientGone(ServiceError):
    """The client closed its connection; the answer can never be delivered.

    499 (nginx's "client closed request") only ever reaches the metrics and the log.
    """

    status_code = 499
    code = "client_disconnected"


class UploadMemory:
    """Bytes of request bodies held in memory by the whole process, bounded (module doc)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the upload memory limit must be >= 1 byte, got {limit}")
        self.limit = limit
        self.in_use = 0
        self.peak = 0  # highest in_use so far

    def hold(self, nbytes: int) -> MemoryHold:
        """Hold ``nbytes`` for a body about to be read, or raise 503 upload_memory_full."""
        hold = MemoryHold(self)
        hold.grow(nbytes)
        return hold

    def _take(self, nbytes: int) -> None:
        if self.in_use + nbytes > self.limit:
            raise Unavailable(
                f"uploads in progress hold {_mb(self.in_use)} of the {_mb(self.limit)} allowed "
                f"(WASTE_MAX_UPLOAD_MEMORY_BYTES); {_mb(nbytes)} more do not fit, retry",
                code="upload_memory_full",
                retry_after_s=1,
                details={"limit": self.limit, "setting": "WASTE_MAX_UPLOAD_MEMORY_BYTES"},
            )
        self.in_use += nbytes
        self.peak = max(self.peak, self.in_use)


@dataclass(eq=False)
class MemoryHold:
    """One request's share of :class:`UploadMemory`; released once its files are decoded."""

    memory: UploadMemory
    nbytes: int = 0

    def grow(self, nbytes: int) -> None:
        if nbytes > 0:
            self.memory._take(nbytes)
            self.nbytes += nbytes

    def cover(self, received: int) -> None:
        """Grow the hold to ``received`` bytes of body; refused: the rest is not wanted."""
        if received > self.nbytes:
            try:
                self.grow(received - self.nbytes)
            except Unavailable as exc:
                exc.headers["Connection"] = "close"
                raise

    def release(self) -> None:
        """Give the bytes back (idempotent)."""
        self.memory.in_use -= self.nbytes
        self.nbytes = 0

    def __enter__(self) -> MemoryHold:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _mb(n: int) -> str:
    return f"{n / 1_048_576:.1f} MiB" if n >= 1_048_576 else f"{n} bytes"


def _too_large(message: str, code: str, limit: int, env: str = "") -> PayloadTooLarge:
    # Closing the connection stops a client that keeps sending a body we will not read.
    details: dict[str, object] = {"limit": limit}
    if env:
        details["setting"] = env
    err = PayloadTooLarge(message, code=code, details=details)
    err.headers["Connection"] = "close"
    return err


@dataclass
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    name: str = ""
    filename: str | None = None
    # BytesIO grows in place (realloc) and getvalue() hands its buffer over without a
    # copy, so a file costs about its size once, not twice as chunks + b"".join would.
    buffer: io.BytesIO = field(default_factory=io.BytesIO)
    size: int = 0


class _Collector:
    """python-multipart callbacks that keep the ``files`` parts and enforce the limits.

    ``on_file(n)`` is called as the ``n``-th file part begins, before any of its bytes
    are kept; it may raise to stop reading (the predictor grows its queue reservation).
    """

    def __init__(
        self,
        limits: UploadLimits,
        field_name: str,
        on_file: Callable[[int], None] | None = None,
    ) -> None:
        self.limits = limits
        self.field_name = field_name
        self.on_file = on_file
        self.files: list[UploadedFile] = []
        self.other_fields: list[str] = []
        self.parts = 0
        self.ended = False
        self._part = _Part()
        self._header_name = b""
        self._header_value = b""

    def on_part_begin(self) -> None:
        self._part = _Part()
        self.parts += 1

    def on_header_begin(self) -> None:
        self._header_name = b""
        self._header_value = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._part.headers.append((self._header_name.lower(), self._header_value))
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        disposition = next((v for k, v in self._part.headers if k == b"content-disposition"), None)
        if disposition is None:
            raise BadRequest(
                "a multipart part has no Content-Disposition header",
                code="malformed_multipart",
            )
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise BadRequest(
                'a multipart part\'s Content-Disposition has no "name"',
                code="malformed_multipart",
            )
        self._part.name = options[b"name"].decode("utf-8", "replace")
        if self._part.name != self.field_name:
            self.other_fields.append(self._part.name)
            return
        count = len(self.files) + 1
        raw_filename = options.get(b"filename")
        self._part.filename = (
            raw_filename.decode("utf-8", "replace") if raw_filename else f"file{count}"
        )
        if count > self.limits.max_files:
            raise _too_large(
                f"more than {self.limits.max_files} files in one request "
                "(WASTE_MAX_FILES_PER_REQUEST)",
                "too_many_files",
                self.limits.max_files,
                "WASTE_MAX_FILES_PER_REQUEST",
            )
        if self.on_file is not None:
            self.on_file(count)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part.name != self.field_name:
            return  # other fields are counted in the body total and dropped
        self._part.size += end - start
        if self._part.size > self.limits.max_file_bytes:
            raise _too_large(
                f"file {self._part.filename!r} is larger than the per-file limit of "
                f"{_mb(self.limits.max_file_bytes)} (WASTE_MAX_FILE_BYTES)",
                "file_too_large",
                self.limits.max_file_bytes,
                "WASTE_MAX_FILE_BYTES",
            )
        self._part.buffer.write(memoryview(data)[start:end])

    def on_part_end(self) -> None:
        if self._part.name == self.field_name:
            assert self._part.filename is not None
            self.files.append(UploadedFile(self._part.filename, self._part.buffer.getvalue()))
            self._part.buffer = io.BytesIO()

    def header_too_long(self) -> PayloadTooLarge:
        """The error for python-multipart's "Maximum header size exceeded" in this part."""
        if self._header_name.strip().lower() == b"content-disposition":
            return _too_large(
                f"the Content-Disposition header of multipart part {self.parts} is longer "
                f"than {MAX_PART_HEADER_BYTES} bytes: its filename is too long",
                "filename_too_long",
                MAX_PART_HEADER_BYTES,
            )
        return _too_large(
            f"a header line of multipart part {self.parts} is longer than "
            f"{MAX_PART_HEADER_BYTES} bytes",
            "part_header_too_large",
            MAX_PART_HEADER_BYTES,
        )

    def on_end(self) -> None:
        self.ended = True


def check_content_type(request: Request) -> bytes:
    """Return the multipart boundary, or raise 415/400 naming what was sent."""
    content_type = request.headers.get("content-type")
    if not content_type:
        raise UnsupportedMediaType(
            "no Content-Type: send multipart/form-data with the images in the field 'files'",
            code="unsupported_media_type",
        )
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type {kind.decode('latin-1')!r} is not supported: send "
            "multipart/form-data with the images in the field 'files'",
            code="unsupported_media_type",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest(
            "multipart/form-data Content-Type without a boundary parameter",
            code="malformed_multipart",
        )
    return boundary


def check_content_length(request: Request, limits: UploadLimits) -> int | None:
    """Refuse a declared body over the limit before reading any of it; return its length."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isascii() or not declared.isdigit() or len(declared) > 18:
        raise BadRequest(f"invalid Content-Length {declared[:40]!r}", code="bad_content_length")
    length = int(declared)
    if length > limits.max_request_bytes:
        raise _too_large(
            f"request body of {_mb(length)} is over the limit of "
            f"{_mb(limits.max_request_bytes)} (WASTE_MAX_REQUEST_BYTES)",
            "request_too_large",
            limits.max_request_bytes,
            "WASTE_MAX_REQUEST_BYTES",
        )
    return length


def hold_body_memory(
    request: Request, limits: UploadLimits, memory: UploadMemory, *, multipart: bool = True
) -> MemoryHold:
    """Check the headers, then hold memory for the declared body before reading any of it.

    A chunked body (no Content-Length) holds nothing yet: the reader grows the hold by
    each chunk before keeping it (:meth:`MemoryHold.cover`).
    """
    if multipart:
        check_content_type(request)
    return memory.hold(check_content_length(request, limits) or 0)


async def read_files(
    request: Request,
    limits: UploadLimits,
    field_name: str = FILES_FIELD,
    *,
    memory: MemoryHold | None = None,
    on_file: Callable[[int], None] | None = None,
) -> list[UploadedFile]:
    """Stream and parse the body; return the uploads of ``field_name`` in order.

    ``memory``: the request's hold on :class:`UploadMemory`, grown when the body is longer
    than what it holds. ``on_file``: see :class:`_Collector`.
    """
    boundary = check_content_type(request)
    check_content_length(request, limits)
    collector = _Collector(limits, field_name, on_file)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": collector.on_part_begin,
            "on_part_data": collector.on_part_data,
            "on_part_end": collector.on_part_end,
            "on_header_begin": collector.on_header_begin,
            "on_header_field": collector.on_header_field,
            "on_header_value": collector.on_header_value,
            "on_header_end": collector.on_header_end,
            "on_headers_finished": collector.on_headers_finished,
            "on_end": collector.on_end,
        },
        max_header_size=MAX_PART_HEADER_BYTES,
    )
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            received = await _feed(request, parser, limits, memory)
    except TimeoutError:
        raise body_timeout(limits.body_timeout_s) from None
    except MultipartParseError as exc:
        if str(exc) == "Maximum header size exceeded":
            raise collector.header_too_long() from None
        raise BadRequest(f"malformed multipart body: {exc}", code="malformed_multipart") from None
    except ClientDisconnect:
        raise ClientGone("the client disconnected before the body was complete") from None
    if not collector.ended:
        raise BadRequest(
            f"malformed multipart body: it ended after {received} bytes without the closing "
            "boundary (truncated upload?)",
            code="malformed_multipart",
        )
    if not collector.files:
        seen = sorted(set(collector.other_fields))
        hint = f" (found only the field(s) {', '.join(map(repr, seen))})" if seen else ""
        raise Unprocessable(
            f"no file in the multipart field '{field_name}'{hint}; upload images as "
            f"-F {field_name}=@photo.jpg",
            code="no_files",
        )
    return collector.files


async def _feed(
    request: Request, parser: MultipartParser, limits: UploadLimits, memory: MemoryHold | None
) -> int:
    """Pass the body to the parser chunk by chunk; return the bytes received."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limits.max_request_bytes:
            raise _too_large(
                f"request body is over the limit of {_mb(limits.max_request_bytes)} "
                "(WASTE_MAX_REQUEST_BYTES)",
                "request_too_large",
                limits.max_request_bytes,
                "WASTE_MAX_REQUEST_BYTES",
            )
        if memory is not None:
            memory.cover(received)
        if chunk:
            parser.write(chunk)
    parser.finalize()
    return received


def body_timeout(timeout_s: float) -> ServiceError:
    err = ServiceError(
        f"the request body did not arrive in full within {timeout_s:g} s (WASTE_BODY_TIMEOUT_S)",
        code="body_timeout",
        status_code=408,
        details={"limit": timeout_s, "setting": "WASTE_BODY_TIMEOUT_S"},
    )
    err.headers["Connection"] = "close"
    return err
