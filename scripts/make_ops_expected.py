#!/usr/bin/env python3
"""Generate the reference fixtures for `troupe-data`'s `ops` unit tests.

Writes small PNG / text / binary files to crates/troupe-data/tests/fixtures/ops/ with inputs
and the outputs of the reference Python calls (OpenCV, Pillow, numpy). The Rust tests only read
these files; Python is not needed at test time.

Requirements: numpy, opencv-python-headless (5.x used here), pillow. The OpenCV <= 4.10
`warpAffine` outputs need a second OpenCV, because 4.11+ replaced the fixed-point bilinear
warp by a float32 one:

    pip install --no-deps --target /tmp/cv410/site opencv-python-headless==4.10.0.84
    OPS_LEGACY_CV2=/tmp/cv410/site python scripts/make_ops_expected.py

Deterministic (fixed seeds). Also prints a few parity notes (e.g. the effect of skimage's
float32 Umeyama on norm_crop) to stdout.
"""

import math
import os
import pickle
import random
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "troupe-data", "tests", "fixtures", "ops")

ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


# --------------------------------------------------------------------------------------------
# Legacy-OpenCV worker (runs in a subprocess with OpenCV 4.10 on the path)
# --------------------------------------------------------------------------------------------

def legacy_worker(path):
    import cv2

    with open(path, "rb") as f:
        jobs = pickle.load(f)
    outs = [cv2.warpAffine(img, M, (w, h), flags=cv2.INTER_LINEAR, borderValue=bv) for img, M, w, h, bv in jobs]
    with open(path, "wb") as f:
        pickle.dump((cv2.__version__, outs), f)


if len(sys.argv) == 3 and sys.argv[1] == "--legacy-warp":
    legacy_worker(sys.argv[2])
    sys.exit(0)

import cv2  # noqa: E402
from PIL import Image  # noqa: E402


def run_legacy(jobs):
    site = os.environ.get("OPS_LEGACY_CV2")
    if not site:
        sys.exit("set OPS_LEGACY_CV2 to a site dir holding opencv-python-headless 4.10 (see docstring)")
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        pickle.dump(jobs, f)
        path = f.name
    env = dict(os.environ, PYTHONPATH=site)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--legacy-warp", path], check=True, env=env)
    with open(path, "rb") as f:
        version, outs = pickle.load(f)
    os.unlink(path)
    assert version.startswith("4."), version
    print(f"legacy warps computed with OpenCV {version}")
    return outs


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def save_png(name, arr):
    arr = np.ascontiguousarray(arr)
    mode = "L" if arr.ndim == 2 else "RGB"
    Image.fromarray(arr, mode).save(os.path.join(OUT, name), optimize=True)


def write_text(name, header, rows):
    with open(os.path.join(OUT, name), "w") as f:
        for h in header:
            f.write(f"# {h}\n")
        for r in rows:
            f.write(" ".join(str(v) for v in r) + "\n")


def umeyama(src, dst, cast64=True):
    """skimage `_umeyama(src, dst, estimate_scale=True)` (SVD form); cast64 computes in float64."""
    if cast64:
        src = np.asarray(src, np.float64)
        dst = np.asarray(dst, np.float64)
    num, dim = src.shape
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_demean = src - src_mean
    dst_demean = dst - dst_mean
    A = dst_demean.T @ src_demean / num
    d = np.ones((dim,), dtype=np.float64)
    if np.linalg.det(A) < 0:
        d[dim - 1] = -1
    T = np.eye(dim + 1, dtype=np.float64)
    U, S, V = np.linalg.svd(A)
    rank = np.linalg.matrix_rank(A)
    if rank == 0:
        return np.nan * T
    elif rank == dim - 1:
        if np.linalg.det(U) * np.linalg.det(V) > 0:
            T[:dim, :dim] = U @ V
        else:
            s = d[dim - 1]
            d[dim - 1] = -1
            T[:dim, :dim] = U @ np.diag(d) @ V
            d[dim - 1] = s
    else:
        T[:dim, :dim] = U @ np.diag(d) @ V
    scale = 1.0 / src_demean.var(axis=0).sum() * (S @ d)
    T[:dim, dim] = dst_mean - scale * (T[:dim, :dim] @ src_mean.T)
    T[:dim, :dim] *= scale
    return T


def arcface_template(size):
    if size % 112 == 0:
        ratio = float(size) / 112.0
        diff_x = 0
    else:
        ratio = float(size) / 128.0
        diff_x = 8.0 * ratio
    dst = ARCFACE_DST * ratio
    dst[:, 0] += diff_x
    return dst


def estimate_norm(kps, size, cast64=True):
    return umeyama(kps, arcface_template(size), cast64)[0:2, :]


def fstr(x):
    return repr(float(x))


def blocky_rgb(rng, w, h, block):
    small = rng.integers(0, 256, ((h + block - 1) // block, (w + block - 1) // block, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, block, 0), block, 1)[:h, :w].copy()


def kps_for(rng, w, h, scale, angle):
    c, s = math.cos(angle), math.sin(angle)
    R = np.array([[c, -s], [s, c]]) * scale
    k = (ARCFACE_DST.astype(np.float64) - 56.0) @ R.T + np.array([w / 2, h / 2]) + rng.normal(0, 1.5, (5, 2))
    return k.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

def make_dilate(rng):
    h, w = 60, 80
    m = np.where(rng.random((h, w)) < 0.01, rng.integers(1, 256, (h, w)), 0).astype(np.uint8)
    m[20:35, 74:80] = 255  # blob touching the right border
    m[0, 5] = 17  # pixel on the top border
    save_png("dilate_in.png", m)
    d7 = cv2.dilate(m, np.ones((7, 7), np.uint8))
    d3 = cv2.dilate(m, np.ones((3, 3), np.uint8))
    save_png("dilate_k7.png", d7)
    save_png("dilate_k3.png", d3)
    contours, _ = cv2.findContours(d7, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    rects = [cv2.boundingRect(c) for c in contours]
    x0 = min(r[0] for r in rects)
    y0 = min(r[1] for r in rects)
    x1 = max(r[0] + r[2] for r in rects)
    y1 = max(r[1] + r[3] for r in rects)
    write_text("dilate_bbox.txt", ["x y w h: union of cv2.boundingRect over external contours of dilate_k7"],
               [(x0, y0, x1 - x0, y1 - y0)])


def make_blur(rng):
    for h, w in [(37, 53), (1, 7), (7, 1), (2, 9), (3, 2), (4, 4)]:
        m = rng.integers(0, 256, (h, w), dtype=np.uint8)
        save_png(f"blur_{h}x{w}_in.png", m)
        save_png(f"blur_{h}x{w}_out.png", cv2.GaussianBlur(m, (5, 5), 0))
    h, w = 60, 80
    m = np.zeros((h, w), np.uint8)
    m[0:12, 0:20] = 255
    m[30:41, 50:61] = rng.integers(0, 256, (11, 11), dtype=np.uint8)
    m = cv2.dilate(m, np.ones((7, 7), np.uint8))
    save_png("blur_roi_in.png", m)
    save_png("blur_roi_out.png", cv2.GaussianBlur(m, (5, 5), 0))


def make_composite(rng):
    p = np.arange(256, dtype=np.uint8)[None, :]
    m = np.arange(256)[:, None] / 255
    v = (p * m + 255 * (1 - m)).astype(np.uint8).astype(np.int64)
    P = np.arange(256)[None, :]
    M = np.arange(256)[:, None]
    exact = (255 * 255 - 255 * M + P * M) // 255
    rows = [(int(pp), int(mm), int(v[mm, pp])) for mm, pp in np.argwhere(v != exact)]
    write_text("composite_exceptions.txt",
               ["p m value: where numpy (p*(m/255) + 255*(1-m/255)).astype(uint8) (float64) differs",
                "from the exact floor((255*255 - 255*m + p*m)/255)"], rows)
    h, w = 14, 20
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = rng.integers(0, 256, (h, w), dtype=np.uint8)
    mask[:3] = 0
    mask[-3:] = 255
    mask[5, :] = 43
    save_png("composite_img.png", img)
    save_png("composite_mask.png", mask)
    mm = mask[..., None] / 255
    save_png("composite_out.png", (img * mm + 255 * (1 - mm)).astype(np.uint8))


def make_rotate(rng):
    rows = []
    small = rng.integers(0, 256, (15, 21, 3), dtype=np.uint8)
    square = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    big = blocky_rgb(rng, 101, 77, 6)
    save_png("rot_small.png", small)
    save_png("rot_square.png", square)
    save_png("rot_big.png", big)
    r = random.Random(1234)
    white, other = (255, 255, 255), (10, 20, 30)
    cases = [("rot_small.png", small, r.uniform(-10, 10), white) for _ in range(3)]
    cases += [
        ("rot_small.png", small, -10.0, white),
        ("rot_small.png", small, 10.0, other),
        ("rot_small.png", small, 45.0, white),
        ("rot_small.png", small, 90.0, white),  # non-square: generic path
        ("rot_small.png", small, 180.0, white),
        ("rot_small.png", small, -1e-15, white),  # sin rounds to 0: ImagingScaleAffine path
        ("rot_small.png", small, 720.5, other),
        ("rot_square.png", square, 90.0, white),
        ("rot_square.png", square, -90.0, white),
        ("rot_square.png", square, 33.3, other),
        ("rot_big.png", big, r.uniform(-10, 10), white),
        ("rot_big.png", big, r.uniform(-10, 10), white),
    ]
    for i, (name, arr, angle, fill) in enumerate(cases):
        out = Image.fromarray(arr).rotate(angle, resample=Image.NEAREST, expand=False, fillcolor=fill)
        oname = f"rot_out_{i:02d}.png"
        save_png(oname, np.asarray(out))
        rows.append((name, repr(angle), ",".join(map(str, fill)), oname))
    write_text("rotate_cases.txt",
               ["input angle(deg, python repr) fill output: PIL Image.rotate(angle, NEAREST, expand=False, fillcolor)"],
               rows)


def make_similarity(rng):
    rows = []
    for size in [112, 224, 128, 256, 224, 336]:
        kps = kps_for(rng, 600, 500, rng.uniform(0.8, 4.0), rng.uniform(-0.7, 0.7))
        M = estimate_norm(kps, size)
        rows.append([fstr(v) for v in kps.reshape(-1)] + [size] + [fstr(v) for v in M.reshape(-1)])
        M32 = estimate_norm(kps, size, cast64=False)
        print(f"similarity size {size}: max |M_skimage_float32 - M_float64| = {np.abs(M32 - M).max():.3g}")
    write_text("similarity_cases.txt",
               ["kps(10, float32 values) size M(6): skimage-style Umeyama in float64 to the insightface template"],
               rows)


def make_warp(rng, report):
    img_noise = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    img_smooth = cv2.GaussianBlur(blocky_rgb(rng, 40, 32, 6), (5, 5), 0)
    save_png("warp_noise.png", img_noise)
    save_png("warp_smooth.png", img_smooth)
    cases = []
    for name, img in [("warp_noise.png", img_noise), ("warp_smooth.png", img_smooth)]:
        for j, (scale, ang, bv) in enumerate([(0.7, 0.4, (0, 0, 0)), (1.9, -0.25, (255, 128, 0))]):
            c, s = math.cos(ang) * scale, math.sin(ang) * scale
            M = np.array([[c, -s, 0.0], [s, c, 0.0]])
            # Centre the source image in the 24x24 output, with a sub-pixel offset.
            ctr = np.array([20.0, 16.0])
            M[:, 2] = np.array([12.3, 11.8]) - M[:, :2] @ ctr
            cases.append((name, img, M, 24, 24, bv))
    outs_new = [cv2.warpAffine(img, M, (w, h), flags=cv2.INTER_LINEAR, borderValue=bv) for _, img, M, w, h, bv in cases]
    outs_old = run_legacy([(img, M, w, h, bv) for _, img, M, w, h, bv in cases])
    rows = []
    for i, ((name, img, M, w, h, bv), a, b) in enumerate(zip(cases, outs_old, outs_new)):
        save_png(f"warp_out_{i}_cv4.png", a)
        save_png(f"warp_out_{i}_cv5.png", b)
        rows.append([name] + [fstr(v) for v in M.reshape(-1)] + [w, h, ",".join(map(str, bv)),
                                                                  f"warp_out_{i}_cv4.png", f"warp_out_{i}_cv5.png"])
        report.append(f"warp case {i} ({name}): |cv4 - cv5| max {np.abs(a.astype(int) - b).max()}")
    write_text("warp_cases.txt",
               ["input M(6) out_w out_h border out_opencv4.10 out_opencv5.0: cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT)"],
               rows)

    # norm_crop (insightface) at 112 px on a blocky image; float64 Umeyama matrix.
    big = blocky_rgb(rng, 160, 120, 16)
    save_png("normcrop_in.png", big)
    kps = kps_for(rng, 160, 120, 0.9, 0.3)
    M = estimate_norm(kps, 112)
    M32 = estimate_norm(kps, 112, cast64=False)
    old = run_legacy([(big, M, 112, 112, 0.0), (big, M32, 112, 112, 0.0)])
    save_png("normcrop_out_cv4.png", old[0])
    d = np.abs(old[0].astype(int) - old[1])
    report.append(f"norm_crop 112: float32-skimage matrix vs float64 matrix: max diff {d.max()}, "
                  f"{(d > 0).mean() * 100:.3f}% of samples")
    write_text("norm_crop_cases.txt",
               ["input kps(10) size output: insightface norm_crop with OpenCV 4.10 warpAffine, float64 Umeyama"],
               [["normcrop_in.png"] + [fstr(v) for v in kps.reshape(-1)] + [112, "normcrop_out_cv4.png"]])


def make_mask_resize(rng):
    blob = np.zeros((80, 96), np.uint8)
    blob[10:50, 20:70] = 255
    blob = cv2.GaussianBlur(cv2.dilate(blob, np.ones((7, 7), np.uint8)), (5, 5), 0)
    blob[60:80, 0:30] = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    noise = rng.integers(0, 256, (13, 17), dtype=np.uint8)
    half = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    save_png("mresize_blob.png", blob)
    save_png("mresize_noise.png", noise)
    save_png("mresize_half.png", half)
    cases = [
        ("mresize_blob.png", blob, 12, 10),
        ("mresize_blob.png", blob, 40, 33),
        ("mresize_blob.png", blob, 7, 50),
        ("mresize_noise.png", noise, 40, 31),
        ("mresize_noise.png", noise, 17, 13),
        ("mresize_noise.png", noise, 1, 1),
        ("mresize_half.png", half, 25, 20),  # exact 2x: cv2 switches to INTER_AREA
        ("mresize_half.png", half, 50, 37),
    ]
    rows = []
    for i, (name, m, w, h) in enumerate(cases):
        out = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
        oname = f"mresize_out_{i}.png"
        save_png(oname, out)
        rows.append((name, w, h, oname))
    write_text("mask_resize_cases.txt", ["input w h output: cv2.resize(INTER_LINEAR)"], rows)


def make_rgb_resize(rng):
    """Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as
    many pixels as the width; Pillow <= 12 always ran horizontal first. Both are produced here
    with Pillow 13: one-shot resize (13) and explicit horizontal-then-vertical calls (<= 12;
    single-axis resizes are the same in both)."""
    assert int(Image.__version__.split(".")[0]) >= 13, "needs Pillow >= 13"
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    img[:, :25] = cv2.GaussianBlur(img[:, :25], (7, 7), 0)  # half smooth, half noise
    save_png("rresize_in.png", img)
    up = img[10:26, 20:40].copy()  # 20x16, half smooth / half noise
    save_png("rresize_up.png", up)
    cases = [
        (23, 17, "lanczos", Image.LANCZOS, "rresize_in.png", img),
        (23, 17, "bicubic", Image.BICUBIC, "rresize_in.png", img),
        (23, 17, "bilinear", Image.BILINEAR, "rresize_in.png", img),
        (50, 17, "lanczos", Image.LANCZOS, "rresize_in.png", img),
        (37, 29, "lanczos", Image.LANCZOS, "rresize_up.png", up),
        (37, 29, "bicubic", Image.BICUBIC, "rresize_up.png", up),
        (9, 40, "bicubic", Image.BICUBIC, "rresize_in.png", img),
        (41, 9, "lanczos", Image.LANCZOS, "rresize_in.png", img),  # 13: vertical first
        (45, 11, "bicubic", Image.BICUBIC, "rresize_in.png", img),  # 13: vertical first
    ]
    rows = []
    n_diff = 0
    for i, (w, h, fname, f, iname, arr) in enumerate(cases):
        pil = Image.fromarray(arr)
        one_shot = np.asarray(pil.resize((w, h), resample=f))
        if w != pil.size[0] and h != pil.size[1]:
            h_then_v = np.asarray(pil.resize((w, pil.size[1]), resample=f).resize((w, h), resample=f))
        else:
            h_then_v = one_shot
        o13 = f"rresize_out_{i}.png"
        save_png(o13, one_shot)
        if np.array_equal(h_then_v, one_shot):
            o12 = o13
        else:
            n_diff += 1
            o12 = f"rresize_out_{i}_pil12.png"
            save_png(o12, h_then_v)
        rows.append((iname, w, h, fname, o12, o13))
    assert n_diff >= 2, "expected the vertical-first cases to differ"
    write_text("rgb_resize_cases.txt",
               ["input w h filter out_pillow<=12 out_pillow13: PIL Image.resize((w, h), resample)"], rows)


def make_color():
    p = np.arange(256)
    x = (p.astype(np.float64) * (1 / 255)).astype(np.float32)  # transformers rescale
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    clip = [((x - mean[c]) / std[c]).astype(np.float32) for c in range(3)]
    unit = p.astype(np.float32) / np.float32(255)  # torchvision ToTensor (float32 division)
    signed = (unit - np.float32(0.5)) / np.float32(0.5)  # Normalize(0.5, 0.5)
    allv = np.concatenate(clip + [unit, signed]).astype("<f4")
    assert allv.dtype == np.dtype("<f4") and allv.size == 5 * 256
    allv.tofile(os.path.join(OUT, "color_luts.f32"))


def make_reference_sizes(rng):
    sizes = [(1024, 1024), (1280, 960), (960, 1280), (853, 640), (855, 640), (2000, 500), (500, 2000),
             (768, 1024), (1286, 960), (1920, 1080), (1080, 1920), (4000, 3000), (640, 480), (333, 777),
             (100, 100), (64, 48), (3000, 3001), (1287, 961), (800, 600), (1200, 1600)]
    sizes += [tuple(int(v) for v in rng.integers(32, 4096, 2)) for _ in range(40)]
    rows = []
    for w, h in sizes:
        scale = min(1286 / max(w, h), 960 / min(w, h))
        nw, nh = round(w * scale), round(h * scale)
        rows.append((w, h, nw // 64 * 64, nh // 64 * 64))
    write_text("reference_sizes.txt",
               ["w h new_w new_h: scale=min(1286/long, 960/short); round(side*scale)//64*64"], rows)


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.unlink(os.path.join(OUT, f))
    print(f"OpenCV {cv2.__version__}, Pillow {Image.__version__}, numpy {np.__version__}")
    rng = np.random.default_rng(20240607)
    report = []
    make_dilate(rng)
    make_blur(rng)
    make_composite(rng)
    make_rotate(rng)
    make_similarity(rng)
    make_warp(rng, report)
    make_mask_resize(rng)
    make_rgb_resize(rng)
    make_color()
    make_reference_sizes(rng)
    for line in report:
        print(line)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{len(os.listdir(OUT))} files, {total} bytes in {OUT}")


if __name__ == "__main__":
    main()
