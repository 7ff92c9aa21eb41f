"""The pixel limit speaks of WASTE_MAX_IMAGE_PIXELS, also where Pillow's own check fires."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from PIL import Image

from app.images import ImageRejected, configure_pillow, decode_image
from tests.app.test_images import P, bomb_png


@pytest.fixture
def pillow_limit() -> Iterator[None]:
    saved = Image.MAX_IMAGE_PIXELS
    configure_pillow(40_000_000)  # the service's default
    yield
    Image.MAX_IMAGE_PIXELS = saved


@pytest.mark.usefixtures("pillow_limit")
@pytest.mark.parametrize(("width", "height"), [(9000, 9000), (100_000, 100_000)])
def test_an_image_over_twice_the_limit_names_the_setting(width: int, height: int) -> None:
    # Over 2x the limit Pillow refuses the header itself, before our own check runs.
    with pytest.raises(ImageRejected) as info:
        decode_image(bomb_png(width, height), "huge.png", P, 40_000_000)
    rejected = info.value
    assert (rejected.status, rejected.code) == (413, "image_too_large")
    assert rejected.message == (
        f"file 'huge.png' is an image of {width * height / 1e6:.1f} MP, over the limit of "
        "40.0 MP (WASTE_MAX_IMAGE_PIXELS)"
    )


@pytest.mark.usefixtures("pillow_limit")
def test_an_image_between_the_limit_and_twice_it_is_refused_by_our_check() -> None:
    with pytest.raises(ImageRejected) as info:
        decode_image(bomb_png(8000, 6000), "big.png", P, 40_000_000)
    assert info.value.message == (
        "file 'big.png' is a 8000x6000 PNG (48.0 MP), over the limit of 40.0 MP "
        "(WASTE_MAX_IMAGE_PIXELS)"
    )
