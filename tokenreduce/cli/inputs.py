"""Pictures for the commands that ask a model about an image: a file, or a synthetic picture."""

from __future__ import annotations

from pathlib import Path

from tokenreduce.core.errors import TokenReduceError

__all__ = ["DEFAULT_PICTURE", "picture"]

#: ``(width, height)`` of the synthetic picture when no size is given
DEFAULT_PICTURE = (128, 96)


def picture(path: str | None, size: list[int] | None, seed: int):
    """The RGB image at ``path``, else a synthetic one of ``size`` (``make_image(seed, size)``)."""
    from PIL import Image

    from tokenreduce.testing.tiny import make_image

    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise TokenReduceError(f"image file {path!r} not found")
        with Image.open(p) as im:
            return im.convert("RGB")
    return make_image(seed, tuple(size or DEFAULT_PICTURE))
