"""Image files -> 8-bit RGB: the one decode rule and the cheap file check, shared by every reader of image files (the
torch loader, evaluation, the feature cache, the file checks) and matched by the DALI loader.

decode_image(path) -> uint8 [H, W, 3]. PIL opens the file, EXIF orientation is applied (as image viewers and DALI's
decoder do), then by PIL mode:
  RGB, L, 1, P, CMYK, YCbCr, RGBX    PIL's conversion to RGB (1 -> 0/255; P -> its palette colours; CMYK naive).
  LA, RGBA, PA, P + transparency     alpha is dropped: the colour channels as stored (torchvision's ImageFolder and
                                     DALI's decoder do the same; a file whose transparent pixels hold junk colours
                                     shows that junk, so composite such files yourself before training).
  I;16 (16-bit grey, PNG or TIFF)    round(v / 257) = round(v * 255 / 65535), computed (v + 128) // 257 (no ties: 257
                                     is odd): the nearest 8-bit level, 0 -> 0 and 65535 -> 255, and exactly what
                                     DALI's decoder gives (measured on all 65536 values). v >> 8 would floor instead
                                     (up to one level darker). 16-bit colour PNGs are reduced by PIL itself while it
                                     decodes (high byte, v >> 8): they can differ from DALI by one level.
  I (32-bit integer)                 rejected: its value range is unknown (a 12-bit camera, a label map, ...);
                                     convert such files to 8- or 16-bit. Exception: PIL versions that open 16-bit
                                     grey PNGs as I (the file is 16-bit by definition) use the I;16 rule.
  F (32-bit float)                   values in [0, 1] -> round(v * 255) (DALI's rule); any value outside [0, 1] or
                                     non-finite: rejected, naming the range found (its scale is unknown).
  anything else (LAB, HSV, ...)      rejected, naming the mode.
A rejected or undecodable file raises BadImage (a ValueError) naming the path and the reason.

check_image_file(path, dali=False) -> reason or None: the cheap check every loader runs over all files first (size,
signature, end marker; a full decode only where the cheap test cannot decide: a missing end marker, and TIFF, which
has none and may hold a rejected mode). dali=True also rejects what DALI decodes differently from decode_image
(measured with DALI 2.4's CPU decoder, tests/test_image_modes.py): TIFF files other than 8-bit L/RGB/RGBA/CMYK,
16-bit grey or float grey (DALI fails on 1-bit TIFF, reads LA TIFF's alpha as colour, rounds palette and YCbCr
TIFF differently).
"""
from __future__ import annotations

import os

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_EIGHT_BIT = {"RGB", "L", "1", "P", "CMYK", "YCbCr", "RGBX", "LA", "RGBA", "PA"}
_DALI_TIFF_SAME = {("L", 8), ("RGB", 8), ("RGBA", 8), ("CMYK", 8), ("I;16", 16), ("I;16B", 16), ("F", 32)}


class DataError(ValueError):
    """Image data that cannot be read as asked (bad files, a rejected mode, a model that does not take RGB); the
    message names the files. Entry points turn it into a one-line error."""


class BadImage(DataError):
    """A file that cannot be an 8-bit RGB image under decode_image's rule; the message names the path."""


def to_rgb8(im, path: str = "", fmt: str | None = None) -> np.ndarray:
    """A PIL image -> uint8 [H, W, 3] by the module's rule; BadImage names the path for a rejected mode. fmt: the
    file's format (default im.format; a transposed copy has none)."""
    mode, fmt = im.mode, fmt or im.format
    if mode == "RGB":
        return np.asarray(im)
    if mode in _EIGHT_BIT:
        if mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")          # PIL warns converting P + transparency straight to RGB; same colours
        return np.asarray(im.convert("RGB"))
    if mode.startswith("I;16") or (mode == "I" and fmt == "PNG"):
        a = np.asarray(im).astype(np.uint32)
        return _grey(((a + 128) // 257).astype(np.uint8))
    if mode == "I":
        a = np.asarray(im)
        raise BadImage(f"{path}: mode I (32-bit integer samples, values {a.min()}..{a.max()}) has no known value "
                       f"range; convert it to 8- or 16-bit")
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            bad = int((~np.isfinite(a)).sum())
            raise BadImage(f"{path}: mode F (32-bit float) with values {np.nanmin(a):.4g}..{np.nanmax(a):.4g}"
                           + (f" and {bad} non-finite" if bad else "")
                           + "; only floats in [0, 1] are loaded (x 255); convert it to 8- or 16-bit")
        return _grey(np.rint(a * 255).astype(np.uint8))
    raise BadImage(f"{path}: PIL mode {mode} has no rule to 8-bit RGB; convert it to RGB")


def _grey(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)


def decode_image(path: str, opener=None) -> np.ndarray:
    """uint8 [H, W, 3] of the image file at path (the module's rule); BadImage names the path and the reason.
    opener: a callable returning a binary file object holding the image (a member of a tar shard); path then only
    names it in messages."""
    from PIL import Image, ImageOps
    try:
        with Image.open(opener() if opener is not None else path) as im:
            fmt = im.format
            if im.getexif().get(0x0112, 1) != 1:     # EXIF orientation; exif_transpose would copy every image
                im = ImageOps.exif_transpose(im)
            a = to_rgb8(im, path, fmt)
            return a if a.flags.writeable and a.flags.c_contiguous else a.copy()   # PIL's arrays are read-only
    except BadImage:
        raise
    except Exception as exc:
        raise BadImage(f"cannot decode image {path!r}: {exc}") from exc


# file signatures: (offset, bytes); webp is RIFF....WEBP
_MAGIC = {"jpeg": [(0, b"\xff\xd8\xff")], "png": [(0, b"\x89PNG\r\n\x1a\n")], "bmp": [(0, b"BM")],
          "webp": [(0, b"RIFF"), (8, b"WEBP")], "tiff": [(0, b"II*\x00")], "tiff-be": [(0, b"MM\x00*")]}
_PNG_END = b"IEND\xaeB`\x82"


def check_image_file(path: str, dali: bool = False, opener=None) -> str | None:
    """Why `path` cannot be loaded (decode_image, or DALI with dali=True), or None. Reads 16 bytes at the start and
    1 KiB at the end: empty, unreadable, unknown signature; a JPEG without its end marker (FF D9) in the last KiB, or
    a PNG not ending in IEND, is decoded in full to tell a truncated file from one with data appended after the
    image; a TIFF is always decoded in full (no end marker, and its mode may be one the rule rejects).
    opener: as for decode_image (a seekable binary file object of the image; path names it in messages)."""
    try:
        with (opener() if opener is not None else open(path, "rb")) as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return "empty file (0 bytes)"
            f.seek(0)
            head = f.read(16)
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as exc:
        return f"unreadable: {exc}"
    kind = next((k for k, sigs in _MAGIC.items() if all(head[o:o + len(m)] == m for o, m in sigs)), None)
    if kind is None:
        return f"not an image (unrecognised signature {head[:8].hex()})"
    if kind.startswith("tiff"):
        return _check_tiff(path, dali, opener)
    if (kind == "jpeg" and b"\xff\xd9" not in tail) or (kind == "png" and not tail.endswith(_PNG_END)):
        try:
            decode_image(path, opener)
        except BadImage as exc:
            return f"truncated or corrupt {kind} ({size} bytes): {exc.__cause__ or exc}"
    return None


def _check_tiff(path: str, dali: bool, opener=None) -> str | None:
    from PIL import Image
    try:
        decode_image(path, opener)
    except BadImage as exc:
        return str(exc.__cause__ or exc).replace(f"{path}: ", "")
    with Image.open(opener() if opener is not None else path) as im:                      # decodable, so it opens
        mode, bits = im.mode, max(im.tag_v2.get(258, (1,)) or (1,))   # BitsPerSample; TIFF default 1
    if dali and (mode, bits) not in _DALI_TIFF_SAME:
        return (f"TIFF mode {mode} ({bits}-bit): DALI decodes it differently from the torch loader; use "
                f"data.loader=cpu or convert the file to PNG")
    return None
