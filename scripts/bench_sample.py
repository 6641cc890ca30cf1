#!/usr/bin/env python3
"""Seconds per generated image: `troupe sample` vs the reference StoryMaker pipeline, same CPU,
same thread count, same inputs, measured in one run.

What runs on each side (the same work):
* Python: the REFERENCE'S OWN `pipeline_sdxl_storymaker.StableDiffusionXLStoryMakerPipeline`
  from a checkout of RedAIGC/StoryMaker, set up exactly as scripts/make_pipeline_fixtures.py
  main() sets it up (its functions and constants are imported, not copied: `import_reference`,
  `make_tiny_faceid_plus` patched in as `faceid_plus`, `clip_processor_class` at CLIP_SIZE, the
  tiny CLIP image encoder of configs/tiny-sdxl, `set_image_proj_model` / `set_ip_adapter(lora_rank
  4)` / `set_ip_adapter_scale`), float32 on the CPU, `UniPCMultistepScheduler.from_config`.
* troupe: `troupe sample --jobs JOBS.jsonl` (the release binary, `--device cpu`), with
  `--batch-size 1` where the binary has that flag (its default batches up to 4 consecutive
  jobs into one UNet batch; the benchmark compares one image per call on both sides).
* Same inputs on both sides: the adapter made by `troupe adapter init --unet-config
  <unet/config.json> --rank 4 --clip-dim 24 --ppr-dim-head 8 --ppr-depth 1 --seed 0` and
  exported with `troupe export --format storymaker-bin` (Python loads that .bin through the
  reference's own loaders: the same weights); one character reference from
  make_pipeline_fixtures.make_reference(REFERENCES[0]) written to PNG / .npy / JSON (troupe gets
  `--reference image=…,mask=…,embedding=…,keypoints=…`, Python the files read back); prompt +
  negative prompt, UniPC, guidance 7.5 (CFG), ip scale 0.8, LoRA scale 0.8, 1 image per call,
  fixed initial latents (a safetensors file with a tensor `latents`, given to `troupe sample
  --latents` and as the pipeline's `latents=`). As a sanity check the script prints the largest
  pixel difference between the two sides' images (same weights and noise, so it should be a few
  levels at most).
* Threads: Python `torch.set_num_threads(T)` (+ interop threads, OpenCV); troupe
  `RAYON_NUM_THREADS=T` (burn's flex backend parallelises with rayon's global pool, and its
  matrix products use gemm's `Parallelism::Rayon(0)` = that pool's size; `OMP_NUM_THREADS` is set
  too, though nothing in troupe reads it).

Configs:
* `tiny`: configs/tiny-sdxl as is, 64x64 px (8x8 latents).
* `mid`:  the same pipeline with the UNet of scripts/bench_train.py's `mid` (64/128/128
  channels, 2 layers per block, transformer layers (1, 1, 2), head dims (1, 2, 2), cross
  attention 32, text_time; random weights, torch seed 0) written to a temp dir, 256x256 px
  (32x32 latents).

Timing (models loaded before, excluded on both sides; one warm-up image, then --images timed
images, median):
* Python: wall time of each `pipe(...)` call.
* troupe: ONE process runs 1 + N jobs. It prints each image's path on stdout as soon as that
  image (PNG + JSON sidecar) is written, line-buffered, so the time between consecutive lines,
  taken by this script, is one image's generation; the first line (warm-up) is the
  reference point. troupe's own "`K images in S s`" (stderr, the whole generation phase,
  warm-up included) is printed next to it as a cross-check.
* Difference in what the timed part holds: `troupe sample` crops and CLIP-encodes each job's
  references before its generation loop (outside the per-image time), while the reference
  pipeline does crop_image + the image encoder inside every `pipe()` call. The time Python spends
  there is measured (hooks on crop_image and the image encoder) and printed, so the ratio
  without it can be read off too; at these sizes it is small.

Prints per config, e.g.
    tiny: 64x64, 25 steps, CFG, 2 threads: troupe X s/image, Python Y s/image, ratio X/Y

Run (needs the release binary: `cargo build --release -p troupe-cli`; and a StoryMaker checkout):
    mkdir -p /tmp/storymaker
    git -C /work/.mirror/RedAIGC+StoryMaker/repo archive HEAD -- '*.py' | tar -x -C /tmp/storymaker
    ~/.cache/troupe-pyref/bin/python scripts/bench_sample.py --storymaker /tmp/storymaker \
        [--threads N] [--steps 25] [--images 2] [--configs tiny,mid]
(`git archive` prints an error about missing image objects; harmless, every .py file is written.)
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import cv2
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import make_pipeline_fixtures as F  # noqa: E402

TINY = os.path.join(ROOT, "configs/tiny-sdxl")
PROMPT = "a photo of a person walking in a park"
NEGATIVE = "bad quality, ugly"
GUIDANCE = 7.5
IP_SCALE = 0.8
LORA_SCALE = 0.8
LATENT_SEED = 101


def make_mid_model(dst):
    """configs/tiny-sdxl with scripts/bench_train.py's `mid` UNet (random weights, torch seed 0)."""
    from bench_train import write_mid_sdxl

    return write_mid_sdxl(F.TINY, dst)


def run_checked(cmd, env):
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return r


def make_adapter(exe, base, tmp, env):
    """`troupe adapter init` at the tiny PPR sizes + `troupe export --format storymaker-bin`."""
    a = F.ADAPTER
    st = os.path.join(tmp, "adapter.safetensors")
    bin_path = os.path.join(tmp, "adapter.bin")
    run_checked([exe, "adapter", "init", "--unet-config", os.path.join(base, "unet", "config.json"),
                 "--rank", str(a["lora_rank"]), "--clip-dim", str(a["clip_embeddings_dim"]),
                 "--ppr-dim-head", str(a["resampler_dim_head"]), "--ppr-depth", str(a["resampler_depth"]),
                 "--seed", "0", "--out", st], env)
    run_checked([exe, "export", st, "--out", bin_path, "--format", "storymaker-bin"], env)
    return bin_path


def write_reference(tmp):
    """One character (make_pipeline_fixtures.REFERENCES[0]) as files, and as the pipeline reads them."""
    img, mask, emb, kps = F.make_reference(F.REFERENCES[0])
    normed = np.ascontiguousarray(F.make_face_info(kps, emb).normed_embedding, dtype=np.float32)
    files = dict(image=os.path.join(tmp, "person.png"), mask=os.path.join(tmp, "mask.png"),
                 embedding=os.path.join(tmp, "embedding.npy"), keypoints=os.path.join(tmp, "kps.json"))
    img.save(files["image"])
    mask.save(files["mask"])
    np.save(files["embedding"], normed)
    with open(files["keypoints"], "w") as f:
        json.dump(kps.tolist(), f)
    spec = ",".join(f"{k}={v}" for k, v in files.items())
    assert spec.count(",") == 3 and spec.count("=") == 4, f"temp path unusable in --reference: {spec}"
    ref = (Image.open(files["image"]).convert("RGB"), Image.open(files["mask"]).convert("RGB"),
           F.make_face_info(kps, np.load(files["embedding"])))
    return spec, ref


def load_python_pipeline(psm, TinyFaceIdPlus, base, adapter_bin):
    """As make_pipeline_fixtures.main() sets the reference pipeline up (adaptations 1-4 there)."""
    from diffusers import UniPCMultistepScheduler
    from transformers import CLIPVisionModelWithProjection

    pipe = psm.StableDiffusionXLStoryMakerPipeline.from_pretrained(base, torch_dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        os.path.join(TINY, "image_encoder"), torch_dtype=torch.float32
    ).eval()
    pipe.clip_image_processor = F.clip_processor_class()(
        size={"shortest_edge": F.CLIP_SIZE}, crop_size={"height": F.CLIP_SIZE, "width": F.CLIP_SIZE}
    )
    pipe.set_image_proj_model(adapter_bin, 512, 20)
    pipe.set_ip_adapter(adapter_bin, num_tokens=20, lora_rank=F.ADAPTER["lora_rank"])
    pipe.set_ip_adapter_scale(IP_SCALE, LORA_SCALE)
    assert isinstance(pipe.image_proj_model, TinyFaceIdPlus)
    return pipe


class PrepTimer:
    """Seconds the pipeline spends in crop_image and the CLIP image encoder (what troupe does up front)."""

    def __init__(self, pipe):
        self.total = 0.0
        orig = pipe.crop_image

        def crop(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                self.total += time.perf_counter() - t0

        pipe.crop_image = crop
        self._t0 = None
        pipe.image_encoder.register_forward_pre_hook(self._pre)
        pipe.image_encoder.register_forward_hook(self._post)

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.total += time.perf_counter() - self._t0


def python_times(pipe, ref, latents, res, steps, images):
    img, mask, face_info = ref
    prep = PrepTimer(pipe)
    times, preps, first = [], [], None
    for i in range(1 + images):
        prep.total = 0.0
        t0 = time.perf_counter()
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=img, mask_image=mask, face_info=face_info,
                   height=res, width=res, num_inference_steps=steps, guidance_scale=GUIDANCE,
                   ip_adapter_scale=IP_SCALE, lora_scale=LORA_SCALE, num_images_per_prompt=1,
                   latents=latents.clone()).images
        dt = time.perf_counter() - t0
        if i == 0:
            first = np.asarray(out[0])
        else:
            times.append(dt)
            preps.append(prep.total)
    return statistics.median(times), statistics.median(preps), first


def troupe_times(exe, base, adapter_bin, ref_spec, latents_path, res, steps, images, env, tmp):
    jobs = os.path.join(tmp, "jobs.jsonl")
    with open(jobs, "w") as f:
        for i in range(1 + images):
            name = "warmup" if i == 0 else f"timed{i:02}"
            f.write(json.dumps(dict(prompt=PROMPT, negative_prompt=NEGATIVE, references=[ref_spec], name=name)) + "\n")
    out_dir = os.path.join(tmp, "troupe-out")
    cmd = [exe, "sample", "--model", base, "--image-encoder", os.path.join(TINY, "image_encoder"),
           "--adapter", adapter_bin, "--out", out_dir, "--jobs", jobs, "--steps", str(steps),
           "--scheduler", "unipc", "--guidance", str(GUIDANCE), "--ip-scale", str(IP_SCALE),
           "--lora-scale", str(LORA_SCALE), "--width", str(res), "--height", str(res), "--num-images", "1",
           "--latents", latents_path, "--device", "cpu"]
    if "--batch-size" in subprocess.run([exe, "sample", "--help"], capture_output=True, text=True).stdout:
        cmd += ["--batch-size", "1"]  # one image per UNet batch, as the Python calls
    err_path = os.path.join(tmp, "troupe-stderr.txt")
    stamps = []
    with open(err_path, "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        for line in p.stdout:
            if line.strip().endswith(".png"):
                stamps.append(time.perf_counter())
        rc = p.wait()
    stderr = open(err_path).read()
    if rc != 0:
        sys.exit(f"troupe sample failed ({rc}): {' '.join(cmd)}\n{stderr}")
    assert len(stamps) == 1 + images, f"expected {1 + images} image lines from troupe, got {len(stamps)}"
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    summary = next((l.split(";")[0].strip() for l in stderr.splitlines()[::-1] if " images in " in l), "?")
    first = np.asarray(Image.open(os.path.join(out_dir, "warmup-00.png")).convert("RGB"))
    return statistics.median(intervals), summary, first


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storymaker", required=True, help="checkout of RedAIGC/StoryMaker (see docstring)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--images", type=int, default=2, help="timed images per config (after 1 warm-up)")
    ap.add_argument("--configs", default="tiny,mid")
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ap.add_argument("--troupe", default=os.path.join(target, "release", "troupe"))
    a = ap.parse_args()
    if not os.access(a.troupe, os.X_OK):
        sys.exit(f"{a.troupe}: not found (cargo build --release -p troupe-cli)")
    configs = [c for c in a.configs.split(",") if c]
    if any(c not in ("tiny", "mid") for c in configs) or a.images < 1 or a.steps < 1:
        sys.exit("--configs takes tiny and/or mid; --images and --steps must be >= 1")

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(a.threads)
    cv2.setNumThreads(a.threads)
    t = str(a.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=t, OMP_NUM_THREADS=t)

    psm, ip_adapter_faceid, Resampler = F.import_reference(a.storymaker)
    from diffusers.utils import logging as dlogging
    import transformers

    dlogging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    TinyFaceIdPlus = F.make_tiny_faceid_plus(ip_adapter_faceid.faceid_plus, ip_adapter_faceid.FacePerceiverResampler,
                                             Resampler)
    psm.faceid_plus = TinyFaceIdPlus

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-sample-") as tmp:
        ref_spec, ref = write_reference(tmp)
        for name in configs:
            cdir = os.path.join(tmp, name)
            os.makedirs(cdir)
            if name == "tiny":
                base, res = TINY, 64
            else:
                base, res = make_mid_model(os.path.join(cdir, "mid-sdxl")), 256
            adapter_bin = make_adapter(a.troupe, base, cdir, env)
            pipe = load_python_pipeline(psm, TinyFaceIdPlus, base, adapter_bin)
            shape = (1, pipe.unet.config.in_channels, res // pipe.vae_scale_factor, res // pipe.vae_scale_factor)
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(LATENT_SEED))
            latents_path = os.path.join(cdir, "latents.safetensors")
            save_file({"latents": latents.contiguous()}, latents_path)

            py, py_prep, py_img = python_times(pipe, ref, latents, res, a.steps, a.images)
            del pipe
            tr, tr_summary, tr_img = troupe_times(a.troupe, base, adapter_bin, ref_spec, latents_path, res, a.steps,
                                                  a.images, env, cdir)
            diff = int(np.abs(py_img.astype(np.int16) - tr_img.astype(np.int16)).max())
            line = (f"{name}: {res}x{res}, {a.steps} steps, CFG, {a.threads} threads: troupe {tr:.3f} s/image, "
                    f"Python {py:.3f} s/image, ratio {tr / py:.2f}")
            print(line, flush=True)
            print(f"    Python pipe() includes {py_prep:.4f} s/image of crop_image + CLIP encoding (troupe does "
                  f"those before its loop): ratio without it {tr / max(py - py_prep, 1e-9):.2f}; "
                  f"troupe's own summary (warm-up included): {tr_summary}; "
                  f"max |troupe - Python| pixel difference: {diff}/255", flush=True)
            results.append(line)
    if len(results) > 1:
        print("\n".join(results))


if __name__ == "__main__":
    main()
