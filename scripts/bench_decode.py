#!/usr/bin/env python3
"""Decode throughput, one core: the data loader's decoder (`troupe debug decode --repeat N`,
libjpeg-turbo's C decoder as Pillow configures it) against Pillow (`Image.open(f).convert("RGB")`)
on the same files, measured in one run; also checks the two give the same pixels.

Files: a 1280×853 photo-like JPEG written by Pillow at quality 90 (4:2:0), the same as
progressive, and any paths given (e.g. StoryMaker's examples/datasets/001.jpg).

Run (after `cargo build --release -p troupe-cli`):
    ~/.cache/troupe-pyref/bin/python scripts/bench_decode.py [--repeat 50] [FILE ...]
"""
import argparse
import os
import subprocess
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo(path, **kw):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:853, 0:1280].astype(np.float64)
    img = np.stack([128 + 90 * np.sin(x / 40), 128 + 90 * np.cos(y / 30), 128 + 60 * np.sin((x + y) / 25)], -1)
    img += rng.normal(0, 10, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*")
    ap.add_argument("--repeat", type=int, default=50)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ap.add_argument("--troupe", default=os.path.join(target, "release", "troupe"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = [os.path.join(tmp, "photo.jpg"), os.path.join(tmp, "photo_progressive.jpg")] + a.files
        photo(files[0])
        photo(files[1], progressive=True)
        for f in files:
            out = os.path.join(tmp, "out.png")
            r = subprocess.run([a.troupe, "debug", "decode", f, "--out", out, "--repeat", str(a.repeat)],
                               check=True, capture_output=True, text=True, env=dict(os.environ, RAYON_NUM_THREADS="1"))
            troupe_mps = float(r.stdout.split()[0])
            im = Image.open(f).convert("RGB")
            same = np.array_equal(np.asarray(im), np.asarray(Image.open(out).convert("RGB")))
            t = time.perf_counter()
            for _ in range(a.repeat):
                Image.open(f).convert("RGB")
            pil_mps = im.size[0] * im.size[1] / 1e6 * a.repeat / (time.perf_counter() - t)
            print(f"{os.path.basename(f)} {im.size[0]}x{im.size[1]}: troupe {troupe_mps:.1f} MP/s, "
                  f"Pillow {pil_mps:.1f} MP/s, ratio {troupe_mps / pil_mps:.2f}, same pixels: {same}")


if __name__ == "__main__":
    main()
