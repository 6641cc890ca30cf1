#!/usr/bin/env python3
"""Images scored per second: `troupe eval score` vs the Python scorers (transformers CLIPModel +
insightface FaceAnalysis on onnxruntime), same CPU, same thread count, same images, one run.

The work per image is the same on both sides: decode the image file; face analysis (SCRFD
detection at det_size, the largest face, norm_crop, ArcFace) and the cosine with the subject's
reference embedding; CLIP image features (batches of 8) and CLIP-T against the image's prompt
(text features once per distinct prompt of the batch) and CLIP-I against the reference's image
features. Model loading and the reference's own features are outside the timed part on both
sides.

* troupe: `troupe eval score` on a protocol written to a temp dir (one subject, the astronaut
  photo of the face fixtures as a `photo=` reference); its own rate line
  ("scored N/N images (R images/s)", measured from the first image to the last) is read.
* Python: the loop above with `CLIPImageProcessorPil` + `CLIPTokenizer`/`CLIPModel.get_image_features`/`get_text_features`
  (float32, torch.no_grad) and `insightface.app.FaceAnalysis(allowed_modules=[detection,
  recognition]).get` on the same ONNX files (CPUExecutionProvider), wall time of the loop.
* Threads: T for torch (`torch.set_num_threads`) and troupe (`RAYON_NUM_THREADS`); onnxruntime
  runs insightface's sessions with its default (all cores) and tract runs single-threaded.
  Use T = the machine's cores for a like-for-like run.

Configs:
* `tiny`: configs/tiny-scorers (a tiny CLIP; SCRFD/ArcFace stand-ins with buffalo_l's graph
  interfaces) — dominated by per-image overheads.
* `b32`: a random-weight CLIPModel the size of openai/clip-vit-base-patch32 (vision 768 × 12
  layers, patch 32, 224 px; text 512 × 12 layers; projection 512; torch seed 0) written to a
  temp dir with the real tokenizer files, and the same face stand-ins. No real-size face
  models are reachable here, so the face share of the time is small in both configs.

Images: N (default 32) 256×256 crops of the astronaut photo (random offsets, flips and scales;
numpy seed 0), 8 prompts × 4 images per prompt.

Run (needs the release binary: `cargo build --release -p troupe-cli`):
    ~/.cache/troupe-pyref/bin/python scripts/bench_eval.py [--threads 2] [--images 32] [--configs tiny,b32]
Prints per config: troupe X images/s, Python Y images/s, ratio X/Y (>1: troupe faster).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TROUPE = os.path.join(ROOT, "target/release/troupe")
SCORERS = os.path.join(ROOT, "configs/tiny-scorers")
ASTRONAUT = os.path.join(ROOT, "crates/troupe-faces/tests/fixtures/astronaut.png")
TOKENIZER = os.path.join(ROOT, "configs/tiny-sdxl/tokenizer")
DET_SIZE = 320
PROMPTS = ["a woman in a space suit", "a photo of a woman astronaut", "a painting of a woman",
           "a woman on the beach", "a woman wearing a red hat", "a woman in the snow",
           "a watercolor painting of a woman", "a woman reading a book"]
PER_PROMPT = 4
BATCH = 8


def write_b32(out):
    import torch
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=512)
    CLIPModel(config).eval().save_pretrained(out, safe_serialization=True)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(out)
    for f in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, f), out)


def write_images(tmp, n):
    rng = np.random.default_rng(0)
    src = Image.open(ASTRONAUT).convert("RGB")
    folder = os.path.join(tmp, "images", "astronaut")
    os.makedirs(folder)
    items = []
    for k in range(n):
        p, i = divmod(k, PER_PROMPT)
        s = rng.uniform(0.7, 1.0)
        side = int(src.width * s)
        x, y = rng.integers(0, src.width - side + 1), rng.integers(0, src.height - side + 1)
        img = src.crop((x, y, x + side, y + side)).resize((256, 256), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        path = os.path.join(folder, f"p{p:03d}-s0-i{i:02d}.png")
        img.save(path)
        items.append((path, PROMPTS[p % len(PROMPTS)]))
    Image.new("RGB", src.size, (255, 255, 255)).save(os.path.join(tmp, "mask.png"))
    return items


def write_protocol(tmp, clip, n):
    prompts = "".join(f'[[prompts]]\ntext = "{PROMPTS[p % len(PROMPTS)].replace("woman", "{}", 1)}"\n'
                      for p in range(n // PER_PROMPT))
    text = (f'name = "bench"\nimages_per_prompt = {PER_PROMPT}\n[scorers]\nclip = "{clip}"\n'
            f'face_detector = "{SCORERS}/det_tiny.onnx"\nface_recognizer = "{SCORERS}/rec_tiny.onnx"\n'
            f'det_size = {DET_SIZE}\n[[subjects]]\nname = "astronaut"\nclass = "woman"\n'
            f'reference = "photo={ASTRONAUT},mask={tmp}/mask.png"\n{prompts}')
    path = os.path.join(tmp, "protocol.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def bench_troupe(protocol, tmp, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([TROUPE, "eval", "score", "--protocol", protocol, "--images",
                          os.path.join(tmp, "images"), "--out", os.path.join(tmp, "out")],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr)
    rate = float(re.findall(r"scored \d+/\d+ images \(([0-9.]+) images/s\)", out.stderr)[-1])
    return rate, out.stdout.strip().splitlines()[0]


def features(out):
    """Projected features (transformers 5 wraps them in an output's `pooler_output`), normalised."""
    out = getattr(out, "pooler_output", out)
    return out / out.norm(dim=-1, keepdim=True)


def bench_python(clip_dir, items, threads):
    import cv2
    import torch
    from insightface.app import FaceAnalysis
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    torch.set_num_threads(threads)
    models = tempfile.mkdtemp()  # insightface may reopen the files: kept to the end
    for f in ("det_tiny.onnx", "rec_tiny.onnx"):
        shutil.copy(os.path.realpath(os.path.join(SCORERS, f)), models)
    app = FaceAnalysis(name=models, root=models, providers=["CPUExecutionProvider"],
                       allowed_modules=["detection", "recognition"])
    app.prepare(ctx_id=-1, det_thresh=0.5, det_size=(DET_SIZE, DET_SIZE))
    # float32 on both sides (the tiny model is stored in f16; troupe computes in f32).
    model = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    # The PIL backend (transformers 5's default CLIPProcessor uses torchvision's resize, whose
    # arithmetic differs slightly from Pillow's, which troupe reproduces).
    processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)

    def largest(img):
        faces = app.get(img)
        return sorted(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))[-1] if faces else None

    with torch.no_grad():
        ref_bgr = cv2.imread(ASTRONAUT)
        ref_face = largest(ref_bgr).normed_embedding
        ref_clip = features(model.get_image_features(
            **processor(images=Image.open(ASTRONAUT).convert("RGB"), return_tensors="pt")))
        start = time.perf_counter()
        scores = []
        for b in range(0, len(items), BATCH):
            batch = items[b:b + BATCH]
            pil = [Image.open(p).convert("RGB") for p, _ in batch]
            img = features(model.get_image_features(**processor(images=pil, return_tensors="pt")))
            prompts = sorted({t for _, t in batch})
            tok = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
            txt = features(model.get_text_features(input_ids=tok["input_ids"]))
            for k, (path, prompt) in enumerate(batch):
                face = largest(cv2.imread(path))
                fs = max(float(face.normed_embedding @ ref_face), 0.0) * 100 if face is not None else 0.0
                ct = float(img[k] @ txt[prompts.index(prompt)]) * 100
                ci = float(img[k] @ ref_clip[0]) * 100
                scores.append((fs, ct, ci))
        secs = time.perf_counter() - start
    return len(items) / secs, np.mean(scores, axis=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--configs", default="tiny,b32")
    args = ap.parse_args()
    n = args.images - args.images % PER_PROMPT
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            if name == "tiny":
                clip = os.path.join(SCORERS, "clip")
            elif name == "b32":
                clip = os.path.join(tmp, "clip-b32")
                write_b32(clip)
            else:
                sys.exit(f"unknown config {name!r} (tiny, b32)")
            items = write_images(tmp, n)
            protocol = write_protocol(tmp, clip, n)
            ours, line = bench_troupe(protocol, tmp, args.threads)
            theirs, means = bench_python(clip, items, args.threads)
            print(f"{name}: {n} images, {args.threads} threads: troupe {ours:.2f} images/s, "
                  f"Python {theirs:.2f} images/s, ratio {ours / theirs:.2f}")
            print(f"  troupe: {line}")
            print(f"  Python: face_sim {means[0]:.2f} | CLIP-T {means[1]:.2f} | CLIP-I {means[2]:.2f}")


if __name__ == "__main__":
    main()
