"""The README's tritonclient example runs as written against a real server."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from tests.app.conftest import MODEL
from tests.app.v2.conftest import LiveServer
from tests.app.v2.test_routes import photo

README = Path(__file__).resolve().parents[3] / "README.md"


def example() -> str:
    text = README.read_text()
    section = text.split("### Open Inference Protocol (KServe V2)\n", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)
    assert len(blocks) == 1, "the section shows one Python example"
    return blocks[0]


def test_the_readme_example_runs(server: LiveServer, tmp_path: Path) -> None:
    code = example()
    assert '"127.0.0.1:8000"' in code and '"bottle.jpg"' in code and f'"{MODEL}"' in code
    jpeg = tmp_path / "bottle.jpg"
    jpeg.write_bytes(photo(5, "JPEG", (80, 60)))
    code = code.replace('"127.0.0.1:8000"', repr(server.url)).replace(
        '"bottle.jpg"', repr(str(jpeg))
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README example", "exec"), {})
    ready_line, *rest = printed.getvalue().splitlines()
    answer_line = " ".join(line.strip() for line in rest)  # numpy wraps long arrays
    assert ready_line.startswith("True [{'name': 'images', 'datatype': 'BYTES'")
    # The version that answered, then the three labels of the one image.
    assert re.fullmatch(r"2 \[\[(b'[0-9.e-]+:\d+:[a-z_]+' ?){3}\]\]", answer_line), answer_line
