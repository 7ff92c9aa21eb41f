"""The streaming multipart reader: memory held before reading, body timeout, header limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.requests import Request

from app.errors import ServiceError, Unavailable
from app.uploads import (
    MAX_PART_HEADER_BYTES,
    ClientGone,
    UploadLimits,
    UploadMemory,
    hold_body_memory,
    read_files,
)

BOUNDARY = "unitboundary"
LIMITS = UploadLimits(max_request_bytes=100_000, max_file_bytes=50_000, max_files=4)


def part(filename: str, data: bytes, name: str = "files") -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"'
            "\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
    )


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


class Client:
    """An ASGI receive that hands out ``chunks`` and counts what the app asked for."""

    def __init__(self, chunks: list[bytes], then: str = "end") -> None:
        self.chunks = list(chunks)
        self.then = then  # "end": last chunk says more_body=False; "stall"; "disconnect"
        self.received = 0

    async def receive(self) -> dict[str, Any]:
        if self.chunks:
            chunk = self.chunks.pop(0)
            self.received += 1
            more = bool(self.chunks) or self.then != "end"
            return {"type": "http.request", "body": chunk, "more_body": more}
        if self.then == "stall":
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    def request(self, length: int | None) -> Request:
        headers = [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
        receive: Callable[[], Awaitable[Any]] = self.receive
        return Request(scope, receive)


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def test_a_declared_body_holds_its_length_before_any_byte_is_read() -> None:
    memory = UploadMemory(limit=1000)
    first = Client([b"x" * 600])
    hold = hold_body_memory(first.request(600), LIMITS, memory)
    assert (memory.in_use, first.received) == (600, 0)
    second = Client([b"x" * 600])
    with pytest.raises(Unavailable) as info:
        hold_body_memory(second.request(600), LIMITS, memory)
    error = info.value
    assert (error.status_code, error.code) == (503, "upload_memory_full")
    assert "WASTE_MAX_UPLOAD_MEMORY_BYTES" in error.message and "600 bytes" in error.message
    assert error.headers["Retry-After"] == "1"
    assert (memory.in_use, second.received) == (600, 0)  # refused before reading
    hold.release()
    hold.release()  # idempotent
    assert (memory.in_use, memory.peak) == (0, 600)
    with hold_body_memory(second.request(600), LIMITS, memory):
        assert memory.in_use == 600
    assert memory.in_use == 0


def test_a_chunked_body_holds_each_chunk_and_stops_when_memory_runs_out() -> None:
    memory = UploadMemory(limit=2500)
    data = body(part("a.jpg", b"\xab" * 5000))
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    client = Client(chunks)
    hold = hold_body_memory(client.request(None), LIMITS, memory)
    assert hold.nbytes == 0
    with pytest.raises(Unavailable) as info:
        run(read_files(client.request(None), LIMITS, memory=hold))
    assert info.value.code == "upload_memory_full"
    assert info.value.headers["Connection"] == "close"
    assert client.received == 3  # the third chunk did not fit; nothing after it was read
    assert memory.in_use == hold.nbytes == 2000


def test_each_file_is_announced_before_its_bytes_are_kept() -> None:
    seen: list[int] = []

    def on_file(count: int) -> None:
        seen.append(count)
        if count == 3:
            raise Unavailable("no room", code="overloaded")

    data = body(part("a", b"A" * 10), part("notes", b"n", name="notes"), part("b", b"B" * 10))
    client = Client([data])
    files = run(read_files(client.request(len(data)), LIMITS, on_file=on_file))
    assert [(f.filename, f.data) for f in files] == [("a", b"A" * 10), ("b", b"B" * 10)]
    assert seen == [1, 2]  # other fields are not files

    data = body(*(part(f"{i}", bytes([i]) * 70_000) for i in range(3)))
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    client = Client(chunks)
    seen.clear()
    big = UploadLimits(max_request_bytes=300_000, max_file_bytes=100_000, max_files=4)
    with pytest.raises(Unavailable, match="no room"):
        run(read_files(client.request(len(data)), big, on_file=on_file))
    assert seen == [1, 2, 3]
    assert client.received < len(chunks) - 15  # the third file's bytes were never read


def test_a_stalled_body_is_a_408_after_the_body_timeout() -> None:
    data = body(part("a.jpg", b"\xff" * 1000))
    client = Client([data[:500]], then="stall")
    limits = UploadLimits(max_request_bytes=100_000, max_file_bytes=50_000, max_files=4,
                          body_timeout_s=0.3)  # fmt: skip
    started = time.perf_counter()
    with pytest.raises(ServiceError) as info:
        run(read_files(client.request(len(data)), limits))
    elapsed = time.perf_counter() - started
    error = info.value
    assert (error.status_code, error.code) == (408, "body_timeout")
    assert "0.3 s" in error.message and "WASTE_BODY_TIMEOUT_S" in error.message
    assert error.headers["Connection"] == "close"
    assert 0.3 <= elapsed < 3.0


def test_a_client_gone_during_the_body_is_a_499() -> None:
    data = body(part("a.jpg", b"\xff" * 1000))
    client = Client([data[:500]], then="disconnect")
    with pytest.raises(ClientGone) as info:
        run(read_files(client.request(len(data)), LIMITS))
    assert (info.value.status_code, info.value.code) == (499, "client_disconnected")


def test_filenames_up_to_the_part_header_limit_are_kept_and_longer_ones_are_413() -> None:
    long_name = "n" * 5000 + ".jpg"  # python-multipart's own default limit is 4224 bytes
    data = body(part(long_name, b"img"))
    files = run(read_files(Client([data]).request(len(data)), LIMITS))
    assert [f.filename for f in files] == [long_name]

    too_long = "n" * MAX_PART_HEADER_BYTES
    data = body(part("a.jpg", b"img"), part(too_long, b"img"))
    with pytest.raises(ServiceError) as info:
        run(read_files(Client([data]).request(len(data)), LIMITS))
    error = info.value
    assert (error.status_code, error.code) == (413, "filename_too_long")
    assert "multipart part 2" in error.message and f"{MAX_PART_HEADER_BYTES} bytes" in error.message
    assert error.details == {"limit": MAX_PART_HEADER_BYTES}

    header = f"X-Note: {'x' * MAX_PART_HEADER_BYTES}\r\n".encode()
    data = part("a.jpg", b"img").replace(b"\r\n\r\n", b"\r\n" + header + b"\r\n", 1)
    data = body(data)
    with pytest.raises(ServiceError) as info:
        run(read_files(Client([data]).request(len(data)), LIMITS))
    assert (info.value.status_code, info.value.code) == (413, "part_header_too_large")
