#!/usr/bin/env python3
"""A corpus of small JPEG and WebP files with the pixels Pillow decodes from them
(`Image.open(path).convert("RGB")`, what the reference's data loader does).

Writes to crates/troupe-data/tests/fixtures/decode/:
  {name}.jpg / {name}.webp   the encoded files (Pillow's and OpenCV's encoders)
  {name}.png                 Pillow's RGB pixels of the file (8-bit RGB PNG)
  corpus.json                what each file is (encoder, quality, subsampling, progressive, …)

JPEG cases: Pillow at qualities 50/75/95 with 4:2:0, 4:2:2 and 4:4:4 chroma; progressive;
restart markers (OpenCV's IMWRITE_JPEG_RST_INTERVAL); OpenCV defaults and 4:4:4; grayscale;
CMYK (Pillow's Adobe-inverted CMYK); an EXIF orientation tag (Pillow does not rotate on open);
odd sizes throughout (so MCU padding is exercised). WebP cases: lossy (Pillow, OpenCV) at two
qualities, lossless, and lossy with alpha.

Run: ~/.cache/troupe-pyref/bin/python scripts/make_decode_fixtures.py
"""
import io
import json
import os

import cv2
import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates/troupe-data/tests/fixtures/decode")


def picture(w, h, seed):
    """Smooth gradients, hard edges and some noise: every part of the codec gets work."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([
        128 + 100 * np.sin(x / 7.0 + seed),
        128 + 100 * np.cos(y / 5.0),
        ((x // 9 + y // 6) % 2) * 180 + 30,
    ], -1)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def main():
    os.makedirs(OUT, exist_ok=True)
    corpus = {}

    def save(name, data, what):
        ext = "webp" if data[:4] == b"RIFF" else "jpg"
        path = os.path.join(OUT, f"{name}.{ext}")
        with open(path, "wb") as f:
            f.write(data)
        Image.open(path).convert("RGB").save(os.path.join(OUT, f"{name}.png"))
        corpus[f"{name}.{ext}"] = what

    def pil(img, **kw):
        b = io.BytesIO()
        img.save(b, **kw)
        return b.getvalue()

    img = picture(61, 43, 1)
    for q in (50, 75, 95):
        for sub, label in ((2, "420"), (1, "422"), (0, "444")):
            save(f"pil_q{q}_{label}", pil(img, format="JPEG", quality=q, subsampling=sub),
                 dict(encoder="Pillow", quality=q, subsampling=label))
    save("pil_progressive", pil(picture(77, 50, 2), format="JPEG", quality=85, progressive=True),
         dict(encoder="Pillow", progressive=True))
    bgr = cv2.cvtColor(np.asarray(picture(70, 45, 3)), cv2.COLOR_RGB2BGR)
    save("cv2_default", cv2.imencode(".jpg", bgr)[1].tobytes(), dict(encoder="OpenCV"))
    save("cv2_restart", cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])[1].tobytes(),
         dict(encoder="OpenCV", restart_interval=2))
    save("cv2_444", cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])[1].tobytes(),
         dict(encoder="OpenCV", subsampling="444"))
    save("pil_gray", pil(picture(33, 29, 4).convert("L"), format="JPEG", quality=80),
         dict(encoder="Pillow", mode="L"))
    save("pil_cmyk", pil(picture(40, 31, 5).convert("CMYK"), format="JPEG", quality=90),
         dict(encoder="Pillow", mode="CMYK"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display; Pillow's open does not apply it
    save("pil_exif_orientation", pil(picture(50, 30, 6), format="JPEG", quality=90, exif=exif.tobytes()),
         dict(encoder="Pillow", exif_orientation=6))

    wimg = picture(45, 37, 7)
    for q in (60, 90):
        save(f"pil_webp_q{q}", pil(wimg, format="WEBP", quality=q), dict(encoder="Pillow", webp="lossy", quality=q))
    save("pil_webp_lossless", pil(wimg, format="WEBP", lossless=True), dict(encoder="Pillow", webp="lossless"))
    rgba = wimg.convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(45 * 37).reshape(37, 45) % 256).astype(np.uint8)))
    save("pil_webp_alpha", pil(rgba, format="WEBP", quality=80), dict(encoder="Pillow", webp="lossy+alpha"))
    bgr = cv2.cvtColor(np.asarray(wimg), cv2.COLOR_RGB2BGR)
    save("cv2_webp", cv2.imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, 75])[1].tobytes(),
         dict(encoder="OpenCV", webp="lossy", quality=75))
    with open(os.path.join(OUT, "corpus.json"), "w") as f:
        json.dump(corpus, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", len(corpus), "files to", OUT)


if __name__ == "__main__":
    main()
