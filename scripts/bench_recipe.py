#!/usr/bin/env python3
"""Per-sample recipe throughput: Python (PIL / OpenCV / NumPy) against `troupe data bench`.

Implements StoryMaker's per-sample recipe (reference/storymaker.md §5.2) the way the reference
code does it, reads the same shards with pyarrow, and runs the Rust benchmark on the same shards
in the same run, then prints samples/s and the ratio per core.

    python scripts/bench_recipe.py SHARD_DIR --troupe target/release/troupe [--samples 64]

Needs: numpy, pillow, opencv-python-headless, pyarrow (all in shared/tools' pinned environment).
Make 1024-class benchmark shards with
    troupe data synth --out /tmp/bench1024 --rows 64 --min-side 896 --max-side 1152 --seed 1
"""

import argparse
import glob
import io
import json
import os
import random
import subprocess
import sys
import time

import cv2
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float32,
)


def reference_size(w, h, max_long=1286, max_short=960, multiple=64):
    scale = min(max_long / max(w, h), max_short / min(w, h))
    return round(w * scale) // multiple * multiple, round(h * scale) // multiple * multiple


def umeyama(src, dst):
    """skimage.transform.SimilarityTransform.estimate (Umeyama, no reflection) -> 2x3."""
    n, d = src.shape
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_d, dst_d = src - src_mean, dst - dst_mean
    a = dst_d.T @ src_d / n
    sign = np.ones(d)
    if np.linalg.det(a) < 0:
        sign[d - 1] = -1
    u, s, vt = np.linalg.svd(a)
    t = np.eye(d + 1)
    t[:d, :d] = u @ np.diag(sign) @ vt
    scale = 1.0 / src_d.var(0).sum() * (s @ sign)
    t[:d, d] = dst_mean - scale * (t[:d, :d] @ src_mean)
    t[:d, :d] *= scale
    return t[:2]


def norm_crop(img, kps, size=224):
    """insightface.utils.face_align.norm_crop (>= 0.7)."""
    ratio = size / 112.0 if size % 112 == 0 else size / 128.0
    dst = ARCFACE_DST * ratio
    if size % 112 != 0:
        dst[:, 0] += 8.0 * ratio
    m = umeyama(kps.astype(np.float64), dst.astype(np.float64))
    return cv2.warpAffine(img, m, (size, size), borderValue=0.0)


def clip_normalize(rgb):
    return ((rgb.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


KERNEL = np.ones((7, 7), np.uint8)


def process(row, rng):
    r = rng.random()
    drop_image = r < 0.05 or 0.25 <= r < 0.30
    angles = [rng.uniform(-10.0, 10.0) for _ in row["characters"]]
    img = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
    w, h = reference_size(*img.size)
    gt = img.resize((w, h))  # PIL default: bicubic
    pixels = (np.asarray(gt, np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
    arr = np.asarray(img)
    chars = []
    for c, angle in zip(row["characters"], angles):
        mask = cv2.imdecode(np.frombuffer(c["mask"]["bytes"], np.uint8), cv2.IMREAD_GRAYSCALE)
        dilated = cv2.dilate(mask, KERNEL, iterations=1)
        soft = cv2.GaussianBlur(dilated, (5, 5), 0)
        contours, _ = cv2.findContours(soft, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        x, y, bw, bh = cv2.boundingRect(np.concatenate(contours))
        loss = cv2.resize(soft, (w // 8, h // 8), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        if drop_image:
            chars.append((None, None, loss))
            continue
        crop = arr[y : y + bh, x : x + bw]
        m = soft[y : y + bh, x : x + bw, None].astype(np.float32) / 255.0
        white = (crop * m + 255.0 * (1.0 - m)).astype(np.uint8)
        kps = np.asarray(c["keypoints"], np.float32).reshape(5, 2) - np.array([x, y], np.float32)
        face = clip_normalize(norm_crop(white, kps, 224))
        body = Image.fromarray(white).rotate(angle, fillcolor=(255, 255, 255)).resize((224, 224), Image.LANCZOS)
        chars.append((clip_normalize(np.asarray(body)), face, loss))
    pose = None
    if row["pose"] is not None:
        p = Image.open(io.BytesIO(row["pose"]["bytes"])).convert("RGB").resize((w, h), Image.BILINEAR)
        pose = (np.asarray(p, np.float32) / 255.0).transpose(2, 0, 1)
    return pixels, chars, pose


def load_rows(paths, limit):
    rows = []
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=16):
            rows.extend(batch.to_pylist())
            if len(rows) >= limit:
                return rows[:limit]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", help="shard file or folder of shards")
    ap.add_argument("--troupe", default="target/release/troupe", help="path to the troupe binary")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    paths = sorted(glob.glob(os.path.join(args.shards, "*.parquet"))) if os.path.isdir(args.shards) else [args.shards]
    cv2.setNumThreads(1)  # one core, like the Rust single-thread measurement
    rows = load_rows(paths, args.samples)
    best = float("inf")
    for _ in range(args.repeats):
        rng = random.Random(0)
        t0 = time.perf_counter()
        for row in rows:
            process(row, rng)
        best = min(best, time.perf_counter() - t0)
    py = len(rows) / best

    cmd = [args.troupe, "data", "bench", args.shards, "--samples", str(len(rows)), "--repeats", str(args.repeats), "--json"]
    rust = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    one = next(r["samples_per_s"] for r in rust["recipe"] if r["threads"] == 1)
    print(f"samples: {len(rows)} from {len(paths)} shard(s); best of {args.repeats} passes")
    print(f"python (PIL/OpenCV/NumPy, 1 thread): {py:8.2f} samples/s")
    for r in rust["recipe"]:
        print(f"troupe recipe, {r['threads']:>2} thread(s):    {r['samples_per_s']:8.2f} samples/s")
    print(f"troupe loader end to end ({rust['loader']['workers']} workers): {rust['loader']['samples_per_s']:8.2f} samples/s")
    print(f"ratio per core (troupe 1 thread / python): {one / py:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
