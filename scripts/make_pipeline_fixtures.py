#!/usr/bin/env python3
"""Generate StoryMaker inference-pipeline parity fixtures with the REFERENCE'S OWN CODE.

Imports `pipeline_sdxl_storymaker.StableDiffusionXLStoryMakerPipeline`,
`ip_adapter.ip_adapter_faceid.faceid_plus` / `FacePerceiverResampler` and
`ip_adapter.resampler.Resampler` from a checkout of RedAIGC/StoryMaker, loads the tiny random-weight
SDXL pipeline `configs/tiny-sdxl` into that pipeline (float32, CPU), swaps in
`UniPCMultistepScheduler.from_config(pipe.scheduler.config)` as the reference's infer.py does, and
runs the pipeline's own `__call__`.

Writes to crates/troupe-diffusion/tests/fixtures/pipeline/:

* adapter.bin          a random, non-trivial StoryMaker adapter at tiny sizes, saved exactly as
                       train_storymaker.py::save_progress saves mask.bin:
                       torch.save({'image_proj_model': image_proj_model.state_dict(),
                                   'ip_adapter': ModuleList(unet.attn_processors.values()).state_dict()})
                       (tensors in float16 to keep the fixture small) and loaded back through the
                       pipeline's own set_image_proj_model / set_ip_adapter.
* adapter.json         the tiny adapter sizes (troupe's FaceIdPlusConfig field names + lora_rank).
* person_{k}.png, mask_{k}.png, embedding_{k}.npy, kps_{k}.json   (k = 0, 1) synthetic references:
                       RGB image, RGB person mask (white on black, anti-aliased edges; mask_1 has two
                       separate blobs), the 512-float L2-normalised id embedding exactly as
                       `face_info.normed_embedding` returns it, 5 face keypoints [x, y] in image pixels.
* {case}_{i}.png       the uint8 images of the pipeline's "pil" output (plain_diffusers_{i}.png: the
                       stock StableDiffusionXLPipeline).
* cases.json           per case: every pipeline argument, scheduler class and config, references in
                       slot order, timesteps, num_images, the latent seed, and the pixel processor.
* outputs.safetensors  float32 tensors, per case:
      {case}.latents        initial latents passed as `latents=` (before * init_noise_sigma), (N,4,H/8,W/8)
      {case}.step{i:02}     latents after scheduler step i (callback_on_step_end)
      {case}.image          final image, output_type="np" (N,H,W,3) in [0,1]
      {case}.body_pixels    CLIP pixel values of the character crops, slot order (what crop_image returns)
      {case}.face_pixels    CLIP pixel values of the aligned face crops
      {case}.ip_tokens      prompt_image_emb as passed to the UNet (2N, (1+B)*20, 32), uncond rows first
      {case}.prompt_embeds  text embeddings after the CFG concatenation (2N, 77, 32), negative first
      {case}.pooled         add_text_embeds after the CFG concatenation (2N, 16)
      {case}.time_ids       add_time_ids as passed to the UNet (2N, 6)
  plus plain.diffusers_image (the stock SDXL pipeline's image for the `plain` case).

Cases (fixed initial latents from a seeded torch generator; float32; deterministic algorithms;
1 torch thread):
* one   1 character (person_0), prompt + negative prompt, 64x80 (HxW), 25 steps, cfg 7.5,
        ip_adapter_scale 0.8, lora_scale 0.8, 1 image.
* two   2 characters (person_0 slot 0, person_1 slot 1), no negative prompt (force_zeros_for_empty_prompt
        zeroes the negative text embeddings), 72x56 (latent 9x7, odd sizes reach the upsamplers),
        12 steps, cfg 5.0, ip 0.6, lora 0.9, 2 images per prompt.
* plain the inputs of `one` with ip_adapter_scale 0 and lora_scale 0, and the stock
        diffusers.StableDiffusionXLPipeline (fresh UNet without adapter processors, same UniPC config,
        prompt, negative, latents, steps, guidance, size): both images are recorded.

Adaptations to the tiny model (the reference hard-codes SDXL/ViT-H sizes); nothing in the
reference checkout is edited:
1. `faceid_plus` hard-codes dim_head 64, depth 4 and `resample` dim 1280 / 20 heads, and the pipeline
   builds it with clip_embeddings_dim=1280. `TinyFaceIdPlus` below subclasses the reference's
   `faceid_plus`, keeps its `forward` unchanged, and its `__init__` builds the same attributes in the
   same order (cross_attention_dim, num_tokens=4, proj, norm, pos_embed, bg_embed, proj_out, norm_out,
   perceiver_resampler, resample) with the reference's own FacePerceiverResampler / Resampler at:
   cross_attention_dim 32 (from the UNet), id_embeddings_dim 512 (proj hidden 2*512, as the reference),
   clip_embeddings_dim 24 (the tiny CLIP vision hidden size; the 1280 the pipeline passes is replaced),
   depth 1, dim_head 8 (face resampler 32/8 = 4 heads; `resample` dim 24, 24/8 = 3 heads),
   num_queries 16, ff_mult 4, 3 character slots, 4+16 = 20 tokens per slot. It is patched into the
   pipeline module's namespace (`pipeline_sdxl_storymaker.faceid_plus`) so `set_image_proj_model`
   builds it.
2. `set_ip_adapter(ckpt, num_tokens=20, lora_rank=4)` instead of the default rank 128.
3. `load_storymaker_adapter` is not used (it hard-codes `CLIPImageProcessor()` at 224 px and rank 128);
   its steps are done one by one: `pipe.image_encoder` = the tiny CLIPVisionModelWithProjection
   (configs/tiny-sdxl/image_encoder, float32; hidden 24, image 32, patch 8),
   `pipe.clip_image_processor` = CLIP image processor with size {"shortest_edge": 32} and crop_size
   32x32 (everything else default: bicubic resize, centre crop, 1/255, CLIP mean/std),
   set_image_proj_model, set_ip_adapter, set_ip_adapter_scale. `crop_image` still resizes the body
   crop to 224x224 and `norm_crop`s the face to 224 before the processor brings both to 32.
4. Version shim: in transformers >= 5 the class named `CLIPImageProcessor` is the torchvision
   backend; the reference was written against transformers 4.x where it is the PIL/NumPy processor
   (PIL bicubic resize on uint8, float64 rescale, float32 normalise). The PIL one, `CLIPImageProcessorPil`
   in transformers 5, is used when it exists (otherwise `CLIPImageProcessor`); the printed summary
   gives the max difference the torchvision backend would make on the recorded crops.
5. The adapter is built as train_storymaker.py main() builds it (faceid_plus with
   clip_embeddings_dim = image_encoder hidden size; the reference's LoRAAttnProcessor2_0 on attn1,
   LoRAIPAttnProcessor2_0 on the others, hidden size from the block), then EVERY parameter is replaced
   by seeded random values (the zero-initialised pos_embed, bg_embed, proj_out and LoRA `up` too):
   Linear / LoRA down and up / to_k_ip / to_v_ip / resample.latents: N(0,1)/sqrt(fan_in) (LoRA up:
   fan_in = rank); pos_embed, bg_embed: 0.5*N(0,1); LayerNorm weights 1 + 0.1*N(0,1); biases
   0.05*N(0,1). With these the ip/lora 0.8 image differs clearly from the scale-0 image (see the
   printed summary).
6. Import shim: ip_adapter/ip_adapter_faceid.py imports `diffusers.pipelines.controlnet.MultiControlNetModel`,
   which diffusers 0.42 only exports from `diffusers.models.controlnets`; the script re-exports it
   under the old name before importing the reference (the class is never used on this path).
7. `face_info` is insightface's `insightface.app.common.Face(kps=..., embedding=...)` (a dict with
   attribute access, so both `face_info['kps']` and `face_info.normed_embedding` work).
Each case runs twice (output_type "np", then "pil"); the step latents of both runs are asserted equal
and the PNGs equal round(np * 255). The `plain` intermediates duplicate `one`'s (same inputs).
adapter.bin is ~2.9 MB, dominated by proj.0 (512 x 1024 floats), whose size the reference fixes
(hidden = 2 * id_embeddings_dim).
Everything else (crop_image, bounding_rectangle, the CFG branch, encode_prompt, UniPC, VAE decode,
postprocess) is the reference / diffusers code as installed.

Make the StoryMaker checkout from the mirror, then run with the pinned env:

    mkdir -p /tmp/storymaker
    git -C /work/.mirror/RedAIGC+StoryMaker/repo archive HEAD -- '*.py' | tar -x -C /tmp/storymaker
    ~/.cache/troupe-pyref/bin/python scripts/make_pipeline_fixtures.py --storymaker /tmp/storymaker

(only the Python files are needed; the mirror lacks the large image blobs, so `git archive` prints
an "invalid object ... assets/compare.png" error but still writes every .py file. Any
`git clone https://github.com/RedAIGC/StoryMaker` at a7ce766d works too.) Running it twice gives
byte-identical files; it takes well under a minute on one CPU thread.
"""

import argparse
import json
import math
import os
import sys
import warnings

import cv2
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(ROOT, "configs/tiny-sdxl")
OUT = os.path.join(ROOT, "crates/troupe-diffusion/tests/fixtures/pipeline")

THREADS = 1
ADAPTER = {
    "lora_rank": 4,
    "cross_attention_dim": 32,
    "id_embeddings_dim": 512,
    "clip_embeddings_dim": 24,
    "num_tokens": 4,
    "resampler_depth": 1,
    "resampler_dim_head": 8,
    "resampler_num_queries": 16,
    "resampler_ff_mult": 4,
    "max_characters": 3,
}
CLIP_SIZE = 32  # tiny image encoder input (224 for ViT-H/14)

# (width, height, seed, extra blob, tilt in degrees, body reaches the bottom edge)
REFERENCES = [
    dict(width=96, height=80, seed=11, extra_blob=False, tilt=0.0, body_to_bottom=True),
    dict(width=72, height=88, seed=12, extra_blob=True, tilt=-12.0, body_to_bottom=False),
]

CASES = {
    "one": dict(
        refs=[0],
        latent_seed=101,
        args=dict(
            prompt="a photo of a person walking in a park",
            negative_prompt="bad quality, ugly",
            height=64,
            width=80,
            num_inference_steps=25,
            guidance_scale=7.5,
            ip_adapter_scale=0.8,
            lora_scale=0.8,
            num_images_per_prompt=1,
        ),
    ),
    "two": dict(
        refs=[0, 1],
        latent_seed=102,
        args=dict(
            prompt="two people talking",
            height=72,
            width=56,
            num_inference_steps=12,
            guidance_scale=5.0,
            ip_adapter_scale=0.6,
            lora_scale=0.9,
            num_images_per_prompt=2,
        ),
    ),
}
CASES["plain"] = dict(
    refs=[0],
    latent_seed=CASES["one"]["latent_seed"],
    args=dict(CASES["one"]["args"], ip_adapter_scale=0.0, lora_scale=0.0),
)
RECORDED = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]


# ----------------------------------------------------------------------------------------------
# reference import (+ minimal shims)


def import_reference(checkout):
    # Shim: ip_adapter/ip_adapter_faceid.py (and ip_adapter.py) import
    # `diffusers.pipelines.controlnet.MultiControlNetModel`, which newer diffusers only export from
    # `diffusers.models.controlnets`; re-export it there (it is never used on this path).
    import diffusers.pipelines.controlnet as dpc

    try:
        dpc.MultiControlNetModel
    except (AttributeError, ImportError):
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        dpc.MultiControlNetModel = MultiControlNetModel
    sys.path.insert(0, os.path.abspath(checkout))
    import pipeline_sdxl_storymaker as psm
    from ip_adapter import ip_adapter_faceid
    from ip_adapter.resampler import Resampler

    return psm, ip_adapter_faceid, Resampler


def clip_processor_class():
    # Shim 4 (see docstring): the transformers-4.x `CLIPImageProcessor` is `CLIPImageProcessorPil` in 5.x.
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def make_tiny_faceid_plus(faceid_plus, FacePerceiverResampler, Resampler):
    class TinyFaceIdPlus(faceid_plus):
        """The reference `faceid_plus` at tiny sizes; `forward` is inherited unchanged."""

        def __init__(self, cross_attention_dim=2048, id_embeddings_dim=512, clip_embeddings_dim=1280):
            torch.nn.Module.__init__(self)
            a = ADAPTER
            assert cross_attention_dim == a["cross_attention_dim"], cross_attention_dim
            assert id_embeddings_dim == a["id_embeddings_dim"], id_embeddings_dim
            # The pipeline hard-codes 1280; the training script passes the encoder's hidden size.
            assert clip_embeddings_dim in (1280, a["clip_embeddings_dim"]), clip_embeddings_dim
            clip_embeddings_dim = a["clip_embeddings_dim"]
            tokens = a["num_tokens"] + a["resampler_num_queries"]
            self.cross_attention_dim = cross_attention_dim
            self.num_tokens = a["num_tokens"]
            self.proj = torch.nn.Sequential(
                torch.nn.Linear(id_embeddings_dim, id_embeddings_dim * 2),
                torch.nn.GELU(),
                torch.nn.Linear(id_embeddings_dim * 2, cross_attention_dim * a["num_tokens"]),
            )
            self.norm = torch.nn.LayerNorm(cross_attention_dim)
            self.pos_embed = torch.nn.Parameter(torch.zeros(a["max_characters"], tokens, cross_attention_dim))
            self.bg_embed = torch.nn.Parameter(torch.zeros(1, tokens, cross_attention_dim))
            self.proj_out = torch.nn.Linear(cross_attention_dim, cross_attention_dim)
            self.norm_out = torch.nn.LayerNorm(cross_attention_dim)
            torch.nn.init.zeros_(self.proj_out.weight)
            torch.nn.init.zeros_(self.proj_out.bias)
            self.perceiver_resampler = FacePerceiverResampler(
                dim=cross_attention_dim,
                depth=a["resampler_depth"],
                dim_head=a["resampler_dim_head"],
                heads=cross_attention_dim // a["resampler_dim_head"],
                embedding_dim=clip_embeddings_dim,
                output_dim=cross_attention_dim,
                ff_mult=a["resampler_ff_mult"],
            )
            self.resample = Resampler(
                dim=clip_embeddings_dim,
                depth=a["resampler_depth"],
                dim_head=a["resampler_dim_head"],
                heads=clip_embeddings_dim // a["resampler_dim_head"],
                num_queries=a["resampler_num_queries"],
                embedding_dim=clip_embeddings_dim,
                output_dim=cross_attention_dim,
                ff_mult=a["resampler_ff_mult"],
            )

    return TinyFaceIdPlus


# ----------------------------------------------------------------------------------------------
# synthetic references


def coverage(inside, w, h, ss=4):
    """Anti-aliased coverage in [0,1] of a shape given as inside(x, y) on pixel centres, ss x ss supersampled."""
    o = (np.arange(ss) + 0.5) / ss
    ys = (np.arange(h)[:, None] + o[None, :]).reshape(-1)
    xs = (np.arange(w)[:, None] + o[None, :]).reshape(-1)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    c = inside(xx, yy).astype(np.float64)
    return c.reshape(h, ss, w, ss).mean(axis=(1, 3))


def ellipse(cx, cy, rx, ry, angle=0.0):
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))

    def inside(x, y):
        dx, dy = x - cx, y - cy
        u = ca * dx + sa * dy
        v = -sa * dx + ca * dy
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0

    return inside


def union(*shapes):
    def inside(x, y):
        r = np.zeros(np.broadcast(x, y).shape, dtype=bool)
        for s in shapes:
            r |= s(x, y)
        return r

    return inside


def q16(v):
    """Round to 1/16 px: exact in float32 and short in JSON."""
    return round(float(v) * 16.0) / 16.0


def make_reference(spec):
    w, h = spec["width"], spec["height"]
    rng = np.random.default_rng(spec["seed"])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = xx / w, yy / h

    # Smooth background: per-channel gradients and low-frequency waves.
    bg = np.empty((h, w, 3))
    for c in range(3):
        a, b = rng.uniform(0.2, 0.8), rng.uniform(-0.3, 0.3)
        fx, fy = rng.uniform(1, 3, 2)
        ph = rng.uniform(0, 6.3)
        bg[..., c] = a + b * (u - v) + 0.15 * np.sin(2 * np.pi * (fx * u + fy * v) + ph)

    # Person: head ellipse + body ellipse (+ a separate blob, e.g. a ball, for reference 1).
    cx = w * rng.uniform(0.42, 0.55)
    head_r = h * 0.16
    head_cy = h * 0.28
    head = ellipse(cx, head_cy, head_r * 0.85, head_r, spec["tilt"])
    body_cy = h * 0.74 if spec["body_to_bottom"] else h * 0.66
    body_ry = h * 0.32 if spec["body_to_bottom"] else h * 0.22
    body = ellipse(cx, body_cy, w * 0.22, body_ry)
    shapes = [head, body]
    if spec["extra_blob"]:
        shapes.append(ellipse(w * 0.86, h * 0.70, w * 0.08, h * 0.07))
    c_head, c_body = coverage(head, w, h), coverage(body, w, h)
    c_all = coverage(union(*shapes), w, h)

    skin = np.array(rng.uniform([0.75, 0.55, 0.45], [0.95, 0.7, 0.6]))
    shirt = np.array(rng.uniform(0.1, 0.9, 3))
    shade = 0.85 + 0.15 * np.cos((xx - cx) / (head_r * 1.2))
    stripes = 0.8 + 0.2 * np.sin(2 * np.pi * yy / 7.0 + rng.uniform(0, 6.3))
    img = bg.copy()
    body_col = shirt[None, None, :] * stripes[..., None]
    img = img * (1 - c_body[..., None]) + body_col * c_body[..., None]
    if spec["extra_blob"]:
        c_blob = np.clip(c_all - np.maximum(c_head, c_body), 0, 1)
        ball = np.array([0.9, 0.3, 0.2]) * (0.7 + 0.3 * np.cos(xx / 3.0))[..., None]
        img = img * (1 - c_blob[..., None]) + ball * c_blob[..., None]
    head_col = skin[None, None, :] * shade[..., None]
    img = img * (1 - c_head[..., None]) + head_col * c_head[..., None]

    # Keypoints (eyes, nose, mouth corners) in the head frame, tilted with the head.
    ca, sa = math.cos(math.radians(spec["tilt"])), math.sin(math.radians(spec["tilt"]))
    local = [(-0.36, -0.18), (0.36, -0.18), (0.0, 0.12), (-0.28, 0.46), (0.28, 0.46)]
    kps = []
    for lx, ly in local:
        lx, ly = lx * head_r, ly * head_r
        kps.append([q16(cx + ca * lx - sa * ly), q16(head_cy + sa * lx + ca * ly)])
    # Darker eyes / mouth so the face crop has structure.
    for x, y in kps[:2] + kps[3:]:
        d = np.hypot(xx - x, yy - y)
        img *= 1 - 0.5 * np.exp(-((d / 1.2) ** 2))[..., None]

    img = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    mask = np.clip(np.round(c_all * 255), 0, 255).astype(np.uint8)
    mask = np.repeat(mask[..., None], 3, axis=2)
    emb = rng.standard_normal(512)
    emb = (emb / np.linalg.norm(emb)).astype(np.float32)
    return Image.fromarray(img, "RGB"), Image.fromarray(mask, "RGB"), emb, np.array(kps, dtype=np.float32)


def reference_info(img, mask, kps):
    """Informational debugging aids (not inputs): the crop box bounding_rectangle takes and norm_crop's matrix."""
    from insightface.utils import face_align

    contours, _ = cv2.findContours(np.array(mask)[:, :, 0], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    rects = [cv2.boundingRect(c) for c in contours]
    box = [min(r[0] for r in rects), min(r[1] for r in rects)]
    box += [max(r[0] + r[2] for r in rects), max(r[1] + r[3] for r in rects)]
    return dict(
        size_wh=list(img.size),
        mask_contours=len(rects),
        crop_box_xyxy=box,
        face_align_matrix_224=face_align.estimate_norm(kps, 224).tolist(),
    )


def make_face_info(kps, emb):
    try:
        from insightface.app.common import Face
    except ImportError:  # fallback with the same interface
        class Face(dict):
            __getattr__ = dict.__getitem__

            @property
            def normed_embedding(self):
                return self["embedding"] / np.linalg.norm(self["embedding"])

    return Face(kps=kps, embedding=emb)


# ----------------------------------------------------------------------------------------------
# adapter


def randomise_adapter(image_proj_model, adapter_modules, gen):
    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    with torch.no_grad():
        for name, p in image_proj_model.named_parameters():
            if name in ("pos_embed", "bg_embed"):
                p.copy_(normal(p.shape, 0.5))
            elif p.ndim >= 2:  # Linear weights and resample.latents
                p.copy_(normal(p.shape, 1.0 / math.sqrt(p.shape[-1])))
            elif name.endswith("weight"):  # LayerNorm
                p.copy_(1.0 + normal(p.shape, 0.1))
            else:
                p.copy_(normal(p.shape, 0.05))
        for name, p in adapter_modules.named_parameters():
            if name.endswith("up.weight"):
                p.copy_(normal(p.shape, 1.0 / math.sqrt(p.shape[-1])))
            else:  # LoRA down, to_k_ip, to_v_ip
                p.copy_(normal(p.shape, 1.0 / math.sqrt(p.shape[-1])))


def build_and_save_adapter(psm, TinyFaceIdPlus, path):
    """As train_storymaker.py main() builds the trainable modules, randomised, saved as save_progress does."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet", torch_dtype=torch.float32)
    image_proj_model = TinyFaceIdPlus(
        cross_attention_dim=unet.config.cross_attention_dim,
        id_embeddings_dim=512,
        clip_embeddings_dim=ADAPTER["clip_embeddings_dim"],
    )
    attn_procs = {}
    lora_rank = ADAPTER["lora_rank"]
    for name in unet.attn_processors.keys():
        cross_attention_dim = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        if name.startswith("mid_block"):
            hidden_size = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            block_id = int(name[len("up_blocks.")])
            hidden_size = list(reversed(unet.config.block_out_channels))[block_id]
        elif name.startswith("down_blocks"):
            block_id = int(name[len("down_blocks.")])
            hidden_size = unet.config.block_out_channels[block_id]
        if cross_attention_dim is None:
            attn_procs[name] = psm.LoRAAttnProcessor(
                hidden_size=hidden_size, cross_attention_dim=cross_attention_dim, rank=lora_rank
            )
        else:
            attn_procs[name] = psm.LoRAIPAttnProcessor(
                hidden_size=hidden_size, cross_attention_dim=cross_attention_dim, rank=lora_rank, num_tokens=20
            )
    unet.set_attn_processor(attn_procs)
    adapter_modules = torch.nn.ModuleList(unet.attn_processors.values())
    randomise_adapter(image_proj_model, adapter_modules, torch.Generator().manual_seed(7))
    # Stored as float16 to keep the fixture small (the reference loader copies it into its float32
    # modules exactly, so the pipeline computes with these rounded values).
    half = lambda sd: {k: v.half() for k, v in sd.items()}  # noqa: E731
    proj_sd, ip_sd = half(image_proj_model.state_dict()), half(adapter_modules.state_dict())
    torch.save({"image_proj_model": proj_sd, "ip_adapter": ip_sd}, path)
    upcast = lambda sd: {k: v.float() for k, v in sd.items()}  # noqa: E731
    return upcast(proj_sd), upcast(ip_sd)


# ----------------------------------------------------------------------------------------------
# runs


class Recorder:
    def __init__(self):
        self.steps, self.timesteps, self.cond = [], [], {}

    def __call__(self, pipe, i, t, kw):
        assert i == len(self.steps)
        self.steps.append(kw["latents"].detach().clone())
        self.timesteps.append(int(t))
        if i == 0:
            self.cond = {k: kw[k].detach().clone() for k in RECORDED if k != "latents"}
        return {}


def wrap_method(obj, name, sink):
    orig = getattr(obj, name)

    def wrapped(*a, **k):
        r = orig(*a, **k)
        sink.append(r)
        return r

    setattr(obj, name, wrapped)
    return orig


def run_storymaker(pipe, case, refs, latents, output_type):
    crops, image_embs = [], []
    orig_crop = wrap_method(pipe, "crop_image", crops)
    orig_emb = wrap_method(pipe, "_encode_prompt_image_emb", image_embs)
    rec = Recorder()
    kwargs = dict(CASES[case]["args"])
    for slot, (img, mask, face_info) in enumerate(refs):
        sfx = "" if slot == 0 else f"_{slot + 1}"
        kwargs[f"image{sfx}"] = img
        kwargs[f"mask_image{sfx}"] = mask
        kwargs[f"face_info{sfx}"] = face_info
    try:
        out = pipe(
            **kwargs,
            latents=latents.clone(),
            output_type=output_type,
            callback_on_step_end=rec,
            callback_on_step_end_tensor_inputs=RECORDED,
        ).images
    finally:
        pipe.crop_image = orig_crop
        pipe._encode_prompt_image_emb = orig_emb
    assert len(crops) == len(refs) and len(image_embs) == 1
    return out, rec, crops, image_embs[0]


def run_plain(pipe, case, latents, output_type):
    rec = Recorder()
    a = CASES[case]["args"]
    kwargs = {k: v for k, v in a.items() if k not in ("ip_adapter_scale", "lora_scale")}
    out = pipe(
        **kwargs,
        latents=latents.clone(),
        output_type=output_type,
        callback_on_step_end=rec,
        callback_on_step_end_tensor_inputs=RECORDED,
    ).images
    return out, rec, kwargs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storymaker", required=True, help="checkout of RedAIGC/StoryMaker (see docstring)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()

    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers / skimage deprecations
    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(THREADS)
    cv2.setNumThreads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)

    psm, ip_adapter_faceid, Resampler = import_reference(args.storymaker)
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel, UniPCMultistepScheduler
    from diffusers.utils import logging as dlogging
    from transformers import CLIPVisionModelWithProjection

    dlogging.disable_progress_bar()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    TinyFaceIdPlus = make_tiny_faceid_plus(
        ip_adapter_faceid.faceid_plus, ip_adapter_faceid.FacePerceiverResampler, Resampler
    )
    psm.faceid_plus = TinyFaceIdPlus  # adaptation 1: set_image_proj_model builds the tiny PPR

    out = args.out
    os.makedirs(out, exist_ok=True)

    # References.
    refs = []
    ref_files = []
    for k, spec in enumerate(REFERENCES):
        img, mask, emb, kps = make_reference(spec)
        face_info = make_face_info(kps, emb)
        normed = np.ascontiguousarray(face_info.normed_embedding, dtype=np.float32)
        assert abs(float(np.linalg.norm(normed)) - 1.0) < 1e-6
        img.save(os.path.join(out, f"person_{k}.png"))
        mask.save(os.path.join(out, f"mask_{k}.png"))
        np.save(os.path.join(out, f"embedding_{k}.npy"), normed)
        with open(os.path.join(out, f"kps_{k}.json"), "w") as f:
            json.dump(kps.tolist(), f)
            f.write("\n")
        # Reload from the written files, so the pipeline sees exactly what the fixture holds.
        img = Image.open(os.path.join(out, f"person_{k}.png")).convert("RGB")
        mask = Image.open(os.path.join(out, f"mask_{k}.png")).convert("RGB")
        face_info = make_face_info(kps, np.load(os.path.join(out, f"embedding_{k}.npy")))
        # The file must hold exactly what the pipeline consumes (normed_embedding of the stored vector).
        assert np.array_equal(face_info.normed_embedding, normed)
        refs.append((img, mask, face_info))
        ref_files.append(
            dict(
                image=f"person_{k}.png",
                mask=f"mask_{k}.png",
                embedding=f"embedding_{k}.npy",
                kps=f"kps_{k}.json",
                **reference_info(img, mask, kps),
            )
        )

    # Adapter: build + randomise + save, then load through the pipeline's own code.
    adapter_path = os.path.join(out, "adapter.bin")
    proj_sd, ip_sd = build_and_save_adapter(psm, TinyFaceIdPlus, adapter_path)
    with open(os.path.join(out, "adapter.json"), "w") as f:
        json.dump(ADAPTER, f, indent=2)
        f.write("\n")

    pipe = psm.StableDiffusionXLStoryMakerPipeline.from_pretrained(TINY, torch_dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        os.path.join(TINY, "image_encoder"), torch_dtype=torch.float32
    ).eval()
    Processor = clip_processor_class()
    pipe.clip_image_processor = Processor(
        size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}
    )
    pipe.set_image_proj_model(adapter_path, 512, 20)
    pipe.set_ip_adapter(adapter_path, num_tokens=20, lora_rank=ADAPTER["lora_rank"])
    pipe.set_ip_adapter_scale(0.8, 0.8)
    assert isinstance(pipe.image_proj_model, TinyFaceIdPlus)
    for k, v in pipe.image_proj_model.state_dict().items():
        assert torch.equal(v, proj_sd[k]), k
    for k, v in torch.nn.ModuleList(pipe.unet.attn_processors.values()).state_dict().items():
        assert torch.equal(v, ip_sd[k]), k
    assert pipe.config.force_zeros_for_empty_prompt

    tensors = {}
    cases_json = {}
    images = {}
    for case, spec in CASES.items():
        a = spec["args"]
        n = a["num_images_per_prompt"]
        gen = torch.Generator().manual_seed(spec["latent_seed"])
        latents = torch.randn((n, 4, a["height"] // 8, a["width"] // 8), generator=gen)
        case_refs = [refs[k] for k in spec["refs"]]
        img_np, rec, crops, ip_tokens = run_storymaker(pipe, case, case_refs, latents, "np")
        img_pil, rec2, _, _ = run_storymaker(pipe, case, case_refs, latents, "pil")
        assert all(torch.equal(x, y) for x, y in zip(rec.steps, rec2.steps)), "pipeline not deterministic"
        for i, im in enumerate(img_pil):
            assert np.array_equal(np.asarray(im), (img_np[i] * 255).round().astype(np.uint8))
            im.save(os.path.join(out, f"{case}_{i}.png"))
        images[case] = img_np

        tensors[f"{case}.latents"] = latents
        for i, s in enumerate(rec.steps):
            tensors[f"{case}.step{i:02}"] = s
        tensors[f"{case}.image"] = torch.from_numpy(np.ascontiguousarray(img_np))
        tensors[f"{case}.body_pixels"] = torch.cat([c[0] for c in crops], 0)
        tensors[f"{case}.face_pixels"] = torch.cat([c[1] for c in crops], 0)
        tensors[f"{case}.ip_tokens"] = ip_tokens
        tensors[f"{case}.prompt_embeds"] = rec.cond["prompt_embeds"]
        tensors[f"{case}.pooled"] = rec.cond["add_text_embeds"]
        tensors[f"{case}.time_ids"] = rec.cond["add_time_ids"]
        assert rec.timesteps == [int(t) for t in pipe.scheduler.timesteps]

        entry = dict(
            pipeline=type(pipe).__name__,
            args=dict(a, output_type="np (float) and pil (PNG)"),
            latent_seed=spec["latent_seed"],
            latents_shape=list(latents.shape),
            init_noise_sigma=float(pipe.scheduler.init_noise_sigma),
            scheduler=type(pipe.scheduler).__name__,
            scheduler_config={k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
            references=[ref_files[k] for k in spec["refs"]],
            timesteps=rec.timesteps,
            num_images=n,
            num_characters=len(spec["refs"]),
            ip_tokens_shape=list(ip_tokens.shape),
            pngs=[f"{case}_{i}.png" for i in range(n)],
        )

        if case == "plain":
            unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet", torch_dtype=torch.float32)
            plain = StableDiffusionXLPipeline(
                vae=pipe.vae,
                text_encoder=pipe.text_encoder,
                text_encoder_2=pipe.text_encoder_2,
                tokenizer=pipe.tokenizer,
                tokenizer_2=pipe.tokenizer_2,
                unet=unet,
                scheduler=UniPCMultistepScheduler.from_config(pipe.scheduler.config),
                force_zeros_for_empty_prompt=True,
            )
            plain.set_progress_bar_config(disable=True)
            d_np, d_rec, d_args = run_plain(plain, case, latents, "np")
            d_pil, _, _ = run_plain(plain, case, latents, "pil")
            for i, im in enumerate(d_pil):
                im.save(os.path.join(out, f"plain_diffusers_{i}.png"))
            tensors["plain.diffusers_image"] = torch.from_numpy(np.ascontiguousarray(d_np))
            assert d_rec.timesteps == rec.timesteps
            entry["diffusers"] = dict(
                pipeline=type(plain).__name__,
                args=dict(d_args, output_type="np (float) and pil (PNG)"),
                scheduler=type(plain.scheduler).__name__,
                pngs=[f"plain_diffusers_{i}.png" for i in range(n)],
                max_abs_diff_image=float(np.abs(d_np - img_np).max()),
                max_abs_diff_final_latents=float((d_rec.steps[-1] - rec.steps[-1]).abs().max()),
            )
        cases_json[case] = entry

    meta = dict(
        generator="scripts/make_pipeline_fixtures.py",
        reference="RedAIGC/StoryMaker pipeline_sdxl_storymaker.py (a7ce766d)",
        model="configs/tiny-sdxl",
        image_encoder="configs/tiny-sdxl/image_encoder",
        adapter="adapter.bin",
        adapter_config="adapter.json",
        dtype="float32",
        device="cpu",
        torch_threads=THREADS,
        clip_image_processor=dict(
            cls=Processor.__name__,
            size={"shortest_edge": CLIP_SIZE},
            crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE},
            resample="bicubic (PIL)",
            rescale_factor=1 / 255,
            image_mean=list(pipe.clip_image_processor.image_mean),
            image_std=list(pipe.clip_image_processor.image_std),
            note="crop_image resizes the body crop to 224x224 (PIL bicubic) and norm_crops the face to 224 first",
        ),
        image_encoder_features="hidden_states[-2]",
        versions=dict(
            torch=torch.__version__,
            diffusers=__import__("diffusers").__version__,
            transformers=transformers.__version__,
        ),
        cases=cases_json,
    )
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    tensors = {k: v.detach().contiguous().float() for k, v in tensors.items()}
    save_file(tensors, os.path.join(out, "outputs.safetensors"))

    # Summary.
    print("wrote", os.path.normpath(out))
    plain = cases_json["plain"]["diffusers"]
    print("max |StoryMaker(ip=0,lora=0) - plain SDXL|: image", plain["max_abs_diff_image"])
    print("                                     final latents", plain["max_abs_diff_final_latents"])
    d = np.abs(images["one"] - images["plain"])
    print(f"|one (ip=lora=0.8) - plain (ip=lora=0)| image: max {d.max():.4f} mean {d.mean():.4f}")
    # What transformers 5's torchvision `CLIPImageProcessor` would change (report only).
    pipe.clip_image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}
    )
    for k, (img, mask, face_info) in enumerate(refs):
        body, face, _ = pipe.crop_image(img, mask, face_info)
        db = float((body - tensors["two.body_pixels"][k]).abs().max())
        df = float((face - tensors["two.face_pixels"][k]).abs().max())
        print(f"reference {k}: max |torchvision - PIL processor| body {db:.4f} face {df:.4f}")


if __name__ == "__main__":
    main()
