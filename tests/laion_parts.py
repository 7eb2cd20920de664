"""Generated LAION parts for the converter tests: real JPEG/PNG/WebP bytes cut from scikit-image's photos,
and one line of every kind of bad input the converter must skip and count."""

from __future__ import annotations

import base64
import io
import random

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def _photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()[..., :3].astype(np.uint8))


_CACHE: dict[str, Image.Image] = {}


def photo(name: str) -> Image.Image:
    if name not in _CACHE:
        _CACHE[name] = _photo(name)
    return _CACHE[name]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def crops(n: int, seed: int = 0, formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP"), min_side: int = 24,
          max_side: int = 80) -> list[tuple[str, bytes, tuple[int, int]]]:
    """n (caption, image bytes, (width, height)) from random photo crops, cycling through ``formats``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = PHOTOS[rng.randrange(len(PHOTOS))]
        img = photo(name)
        w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
        x, y = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
        crop = img.crop((x, y, x + w, y + h))
        fmt = formats[i % len(formats)]
        kw = {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
        out.append((f"a crop of the {name} photo number {i} ({fmt.lower()})", encode(crop, fmt, **kw), (w, h)))
    return out


def bad_lines() -> dict[str, bytes]:
    """One raw line per failure reason (and one kept sample with an empty caption)."""
    jpeg = encode(photo("chelsea").crop((0, 0, 64, 48)), "JPEG", quality=90)
    png = encode(photo("coffee").crop((0, 0, 40, 40)), "PNG")
    b64 = lambda b: base64.b64encode(b)  # noqa: E731
    # a PNG header claiming 20000 x 20000 pixels: a decompression bomb by its header alone
    bomb = bytearray(png)
    bomb[16:24] = (20000).to_bytes(4, "big") * 2
    return {
        "too_few_columns": b"only a caption\t_",
        "invalid_base64": b"caption\t_\t!!!not base64!!!",
        "not_an_image": b"caption\t_\t" + b64(b"just some text, not an image at all"),
        "truncated_image": b"caption\t_\t" + b64(jpeg[: len(jpeg) // 2]),
        "undecodable_text": b"\x80\xff\xfe broken caption\t_\t" + b64(jpeg),
        "image_too_large": b"caption\t_\t" + b64(bytes(bomb)),
        "unsupported_format": b"caption\t_\t" + b64(encode(photo("coffee").crop((0, 0, 20, 20)), "GIF")),
        "empty_caption": b"   \t_\t" + b64(png),
    }


# --- a small dataset with every kind of input ------------------------------------------------------------

def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class Dataset:
    """Three sources in a train.filelist.list, and what the converter must make of them.

    ``expected[source_name]`` lists the good samples of a source in input order as dicts (caption, image,
    size, part, line, layout); ``failures[source_name]`` counts the lines it must skip, by reason.
    """

    def __init__(self, root):
        from pathlib import Path

        from sd_ds.convert.parts import format_line, write_part

        self.root = root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        pics = crops(36, seed=1)
        self.expected: dict[str, list[dict]] = {}
        self.failures: dict[str, dict[str, int]] = {}
        self.weights: dict[str, float] = {}
        self.empty_captions = 0

        def good(source, part, line, caption, image, size, layout="laion400m"):
            self.expected.setdefault(source, []).append(
                {"caption": caption, "image": image, "size": size, "part": str(part), "line": line, "layout": layout})

        def fail(source, reason, n=1):
            counts = self.failures.setdefault(source, {})
            counts[reason] = counts.get(reason, 0) + n

        # Source A (weight 2): a clean gzip part, a part mixing every bad line with good ones, a plain part.
        a = str(root / "a.filelist")
        self.weights[a] = 2.0
        a0 = root / "a0.gz"
        write_part(a0, [(c, b) for c, b, _ in pics[:6]])
        for i, (c, b, s) in enumerate(pics[:6]):
            good(a, a0, i + 1, c, b, s)
        a1 = root / "a1.gz"
        bad = bad_lines()
        chinese = "一只橘猫"
        lines: list[bytes] = []
        plan = [("good", 6), ("too_few_columns",), ("good", 7), ("invalid_base64",), ("not_an_image",),
                ("good", 8), ("truncated_image",), ("undecodable_text",), ("image_too_large",),
                ("unsupported_format",), ("empty_caption",), ("gb18030", 9), ("crlf", 10), ("extra_columns", 11),
                ("good", 12)]
        for step in plan:
            kind, n = step[0], len(lines) + 1
            if kind in ("good", "crlf", "extra_columns", "gb18030"):
                c, b, s = pics[step[1]]
                if kind == "good":
                    lines.append(format_line(c, b))
                elif kind == "crlf":
                    lines.append(format_line(c, b)[:-1] + b"\r\n")
                elif kind == "extra_columns":
                    lines.append(format_line(c, b)[:-1] + b"\tmore\tcolumns\n")
                else:
                    c = chinese
                    lines.append(c.encode("gb18030") + b"\t_\t" + _b64(b) + b"\n")
                good(a, a1, n, c, b, s)
            elif kind == "empty_caption":
                lines.append(bad["empty_caption"])
                png = base64.b64decode(bad["empty_caption"].split(b"\t")[2])
                good(a, a1, n, "", png, (40, 40))
                self.empty_captions += 1
            else:
                lines.append(bad[kind])
                fail(a, kind)
        write_part(a1, lines)
        a2 = root / "a2.txt"  # plain text, not gzip
        write_part(a2, [(c, b) for c, b, _ in pics[13:16]], gzip=False)
        for i, (c, b, s) in enumerate(pics[13:16]):
            good(a, a2, i + 1, c, b, s)
        (root / "a.filelist").write_text(f"# source A\n{a0}\n{a1.name}\n\n{a2}\n")  # a1 relative to the list

        # Source B (weight 0.5): a laion_aes part (with the blip fallback and a broken JSON caption) and a
        # gzip part cut short.
        b_name = str(root / "b.filelist")
        self.weights[b_name] = 0.5
        b0 = root / "b0.gz"
        rows = []
        for i, (c, b, s) in enumerate(pics[16:21]):
            meta = {"caption_en": c} if i != 2 else {"caption_en": "", "blip_caption_en": c}
            rows.append((meta, b))
            good(b_name, b0, len(rows), c, b, s, layout="laion_aes")
        rows.insert(3, b"\t".join([b"_", b"_", b"{not json", b"_", b"_", _b64(pics[30][1])]))
        fail(b_name, "invalid_caption_json")
        # the expected entries after the inserted line move down one line
        for e in self.expected[b_name][3:]:
            e["line"] += 1
        write_part(b0, rows, fmt="laion_aes")
        b1 = root / "b1.gz"
        write_part(b1, [(c, b) for c, b, _ in pics[21:30]])
        data = b1.read_bytes()
        cut = data[: int(len(data) * 0.6)]
        b1.write_bytes(cut)
        import zlib

        # every complete line that can be inflated before the cut is kept
        kept = zlib.decompressobj(31).decompress(cut).count(b"\n")
        assert 0 < kept < 9
        for i, (c, b, s) in enumerate(pics[21:21 + kept]):
            good(b_name, b1, i + 1, c, b, s)
        fail(b_name, "truncated_gzip")
        (root / "b.filelist").write_text(f"{b0}\n{b1}\n")

        # Source C (weight 1, none given): nothing convertible at all.
        c_name = str(root / "c.filelist")
        self.weights[c_name] = 1.0
        c0 = root / "c0.gz"
        write_part(c0, [bad["invalid_base64"], bad["not_an_image"]])
        fail(c_name, "invalid_base64")
        fail(c_name, "not_an_image")
        (root / "c.filelist").write_text(f"{c0}\n")

        self.file_list = root / "train.filelist.list"
        self.file_list.write_text(f"{a} 2.0\n{b_name} 0.5\n{c_name}\n")
        self.source_names = [a, b_name, c_name]
