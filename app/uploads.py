"""Read a multipart/form-data body with hard limits, streaming.

Starlette's form parser does not cap file parts (it spools them to disk), so the service
reads the body itself: it refuses a declared Content-Length over the request limit before
reading anything, counts bytes as they arrive, and stops at the first part or file over
its limit. Files are kept in memory, which the request limit bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType

FILES_FIELD = "files"


@dataclass(frozen=True)
class UploadLimits:
    max_request_bytes: int
    max_file_bytes: int
    max_files: int


@dataclass
class UploadedFile:
    filename: str
    data: bytes


def _mb(n: int) -> str:
    return f"{n / 1_048_576:.1f} MiB" if n >= 1_048_576 else f"{n} bytes"


def _too_large(message: str, code: str, limit: int, env: str) -> PayloadTooLarge:
    # Closing the connection stops a client that keeps sending a body we will not read.
    err = PayloadTooLarge(message, code=code, details={"limit": limit, "setting": env})
    err.headers["Connection"] = "close"
    return err


@dataclass
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    name: str = ""
    filename: str | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


class _Collector:
    """python-multipart callbacks that keep the ``files`` parts and enforce the limits."""

    def __init__(self, limits: UploadLimits, field_name: str) -> None:
        self.limits = limits
        self.field_name = field_name
        self.files: list[UploadedFile] = []
        self.other_fields: list[str] = []
        self.ended = False
        self._part = _Part()
        self._header_name = b""
        self._header_value = b""

    def on_part_begin(self) -> None:
        self._part = _Part()

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
        self._part.chunks.append(data[start:end])

    def on_part_end(self) -> None:
        if self._part.name == self.field_name:
            assert self._part.filename is not None
            self.files.append(UploadedFile(self._part.filename, b"".join(self._part.chunks)))

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


def check_content_length(request: Request, limits: UploadLimits) -> None:
    """Refuse a declared body over the limit before reading any of it."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.isdigit():
        raise BadRequest(f"invalid Content-Length {declared!r}", code="bad_content_length")
    if int(declared) > limits.max_request_bytes:
        raise _too_large(
            f"request body of {_mb(int(declared))} is over the limit of "
            f"{_mb(limits.max_request_bytes)} (WASTE_MAX_REQUEST_BYTES)",
            "request_too_large",
            limits.max_request_bytes,
            "WASTE_MAX_REQUEST_BYTES",
        )


async def read_files(
    request: Request, limits: UploadLimits, field_name: str = FILES_FIELD
) -> list[UploadedFile]:
    """Stream and parse the body; return the uploads of ``field_name`` in order."""
    boundary = check_content_type(request)
    check_content_length(request, limits)
    collector = _Collector(limits, field_name)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": collector.on_part_begin,
            "on_part_data": collector.on_part_data,
            "on_part_end": collector.on_part_end,
            "on_header_field": collector.on_header_field,
            "on_header_value": collector.on_header_value,
            "on_header_end": collector.on_header_end,
            "on_headers_finished": collector.on_headers_finished,
            "on_end": collector.on_end,
        },
    )
    received = 0
    try:
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
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequest(f"malformed multipart body: {exc}", code="malformed_multipart") from None
    except ClientDisconnect:
        raise BadRequest(
            "the client disconnected before the body was complete", code="client_disconnected"
        ) from None
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
