"""A corpus of odd, broken and hostile inputs, generated from one good PNG (nothing committed as
binaries): what tests/test_hardening.py posts to the service and gives to infer.py and predict.py."""
import io
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image

from test_transforms import png_header_only

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_chunks(data):
    """[(offset, kind, body)] of a PNG's chunks."""
    pos, found = len(PNG_SIGNATURE), []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        found.append((pos, kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return found


def replace_chunk(data, kind, body, fix_crc=True):
    """The PNG with the first `kind` chunk's body replaced (same length or not); the CRC is
    recomputed, or the old one kept (`fix_crc=False`)."""
    for pos, k, old in png_chunks(data):
        if k == kind:
            end = pos + 12 + len(old)
            crc = data[end - 4:end] if not fix_crc else struct.pack(">I", zlib.crc32(kind + body))
            return data[:pos] + struct.pack(">I", len(body)) + kind + body + crc + data[end:]
    raise ValueError(f"no {kind} chunk")


def interlaced_png(rgb):
    """An Adam7-interlaced 8-bit RGB PNG (Pillow writes none): each pass's sub-image, rows with
    filter type 0."""
    h, w, _ = rgb.shape
    raw = b""
    for x0, y0, dx, dy in ADAM7:
        sub = rgb[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def odd_inputs(good_png):
    """{name with an extension: bytes}, at least 40 of them. The names' extensions are ones the
    scripts' folder scan takes (.png .jpg .tif .webp .bmp), whatever the content."""
    rgb = np.asarray(Image.open(io.BytesIO(good_png)).convert("RGB"))
    img = Image.fromarray(rgb)
    h, w = rgb.shape[:2]
    gray = img.convert("L")
    idat = next(i for i, (_, k, _) in enumerate(png_chunks(good_png)) if k == b"IDAT")
    idat_pos, _, idat_body = png_chunks(good_png)[idat]
    corpus = {}
    for cut in (8, 20, 33, idat_pos + 40, len(good_png) // 2, len(good_png) - 12):
        corpus[f"png_truncated_at_{cut}.png"] = good_png[:cut]
    for at in (len(idat_body) // 3, len(idat_body) - 100):
        flipped = bytearray(idat_body)
        flipped[at] ^= 0x10
        corpus[f"png_idat_bitflip_{at}_crc_fixed.png"] = replace_chunk(good_png, b"IDAT", bytes(flipped), True)
        corpus[f"png_idat_bitflip_{at}_crc_stale.png"] = replace_chunk(good_png, b"IDAT", bytes(flipped), False)
    for label, (cw, ch) in (("larger", (w + 64, h + 64)), ("smaller", (w // 2, h // 2))):
        ihdr = struct.pack(">IIBBBBB", cw, ch, 8, 2, 0, 0, 0)
        corpus[f"png_ihdr_claims_{label}.png"] = replace_chunk(good_png, b"IHDR", ihdr)
    corpus["png_1bit.png"] = encode(gray.convert("1"), "PNG")
    corpus["png_palette.png"] = encode(img.convert("P"), "PNG")
    corpus["png_palette_transparency.png"] = encode(img.convert("P"), "PNG", transparency=0)
    corpus["png_gray.png"] = encode(gray, "PNG")
    corpus["png_gray_alpha.png"] = encode(Image.merge("LA", (gray, gray.point(lambda v: 255 - v))), "PNG")
    corpus["png_rgba.png"] = encode(img.convert("RGBA"), "PNG")
    corpus["png_16bit.png"] = encode(Image.fromarray(np.asarray(gray, np.uint16) * 257), "PNG")
    corpus["png_interlaced.png"] = interlaced_png(rgb)
    corpus["png_trailing_garbage.png"] = good_png + b"garbage after IEND" * 10
    corpus["png_signature_only.png"] = PNG_SIGNATURE
    corpus["jpeg_baseline.jpg"] = encode(img, "JPEG", quality=90)
    corpus["jpeg_progressive.jpg"] = encode(img, "JPEG", quality=90, progressive=True)
    corpus["jpeg_cmyk.jpg"] = encode(img.convert("CMYK"), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 when shown
    corpus["jpeg_exif_rotated.jpg"] = encode(img, "JPEG", exif=exif)
    corpus["jpeg_garbage_after_end.jpg"] = corpus["jpeg_baseline.jpg"] + b"\0garbage" * 100
    corpus["jpeg_truncated.jpg"] = corpus["jpeg_baseline.jpg"][:len(corpus["jpeg_baseline.jpg"]) // 2]
    corpus["jpeg_soi_only.jpg"] = b"\xff\xd8"
    frames = [Image.fromarray(np.roll(rgb, 8 * i, axis=1)).convert("P") for i in range(3)]
    corpus["gif_animated.png"] = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    corpus["gif_single.png"] = encode(frames[0], "GIF")
    corpus["tiff_multipage.tif"] = encode(img, "TIFF", save_all=True, append_images=[gray.convert("RGB")])
    corpus["tiff_lzw.tif"] = encode(img, "TIFF", compression="tiff_lzw")
    corpus["webp.webp"] = encode(img, "WEBP", quality=80)
    corpus["bmp.bmp"] = encode(img, "BMP")
    corpus["ico.png"] = encode(img.resize((64, 64)), "ICO")
    corpus["svg.png"] = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
                         b'<rect width="64" height="64" fill="red"/></svg>')
    corpus["html.png"] = b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>"
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("part.png", good_png)
    corpus["zip.png"] = zipped.getvalue()
    corpus["pdf.png"] = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    corpus["text.png"] = b"just some text, named like an image\n"
    corpus["zero_bytes.png"] = b""
    corpus["one_byte.png"] = b"\x89"
    corpus["1x1.png"] = encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")
    corpus["12000x1.png"] = encode(Image.new("RGB", (12000, 1), (90, 90, 90)), "PNG")
    corpus["1x60000.png"] = encode(Image.new("RGB", (1, 60000), (90, 90, 90)), "PNG")
    corpus["60000x1.png"] = encode(Image.new("RGB", (60000, 1), (90, 90, 90)), "PNG")
    corpus["16x1600_strip.png"] = encode(Image.new("RGB", (16, 1600), (90, 90, 90)), "PNG")
    corpus["bomb_png_100000x100000.png"] = png_header_only(100000, 100000)
    corpus["bomb_png_7000x7000.png"] = png_header_only(7000, 7000)
    corpus["bomb_jpeg_65000x65000.jpg"] = jpeg_claiming(corpus["jpeg_baseline.jpg"], 65000, 65000)
    corpus["bomb_gif_65535x65535.png"] = gif_claiming(corpus["gif_single.png"], 65535, 65535)
    return corpus


def jpeg_claiming(jpeg, width, height):
    """The JPEG with its frame header (SOF0/SOF2) announcing width x height; its data unchanged."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = jpeg.find(marker)
        if at >= 0:  # marker, length (2), precision (1), height (2), width (2)
            return jpeg[:at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9:]
    raise ValueError("no SOF marker")


def gif_claiming(gif, width, height):
    """The GIF with its logical screen and first image descriptor announcing width x height."""
    size = struct.pack("<HH", width, height)
    at = gif.find(b"\x2c", 13)  # image separator, then left, top (2 + 2), width, height
    return gif[:6] + size + gif[10:at + 5] + size + gif[at + 9:]
