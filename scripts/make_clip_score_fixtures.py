#!/usr/bin/env python3
"""CLIP-T / CLIP-I parity fixtures for troupe-eval: a tiny random transformers `CLIPModel` and the
scores transformers computes with it.

Writes crates/troupe-eval/tests/fixtures/clip_score/:

* model/           `CLIPModel.save_pretrained` (config.json, model.safetensors in float16) and
                   `preprocessor_config.json` of `CLIPImageProcessorPil` (shortest edge 32, centre
                   crop 32: the tiny vision tower's input). The tokenizer is the real CLIP BPE of
                   configs/tiny-sdxl/tokenizer (the test copies it in; not duplicated here).
                   Text tower as openai/clip-vit-large-patch14's: quick_gelu, eos_token_id 2
                   (transformers' legacy argmax pooling); sizes tiny (hidden 8 / 16, 2 layers).
* image_{k}.png    three RGB images of different sizes and aspect ratios (one odd-sized).
* scores.json      captions; for each image its CLIP pixel values' shape; `clip_t[k][j]` =
                   100 · cos(image k, caption j) and `clip_i[k][l]` = 100 · cos(image k, image l),
                   computed by transformers: `get_image_features` / `get_text_features` (projected
                   embeddings), L2-normalised, dot product × 100 — torchmetrics' `CLIPScore`
                   before its clamp at 0; float64 values of the float32 results.
* pixels.safetensors  `image_{k}`: the `CLIPImageProcessorPil` pixel values (float32).

The float16 weights are loaded back and run in float32, so the references use exactly the
weights troupe reads.

Run: ~/.cache/troupe-pyref/bin/python scripts/make_clip_score_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "crates/troupe-eval/tests/fixtures/clip_score")
TOKENIZER = os.path.join(ROOT, "configs/tiny-sdxl/tokenizer")
CAPTIONS = ["a photo of a person walking in a park", "a red car", "two friends talking in a cafe"]
SIZES = [(48, 40), (37, 61), (64, 64)]  # (width, height)


def randomise(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim <= 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def image(k, w, h):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack([
        128 + 100 * np.sin(x / (3 + k) + y / 7),
        128 + 100 * np.cos(y / (4 + k) - x / 11),
        128 + 90 * np.sin((x + y) / (5 + 2 * k)),
    ], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def main():
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=8,
    )
    model = CLIPModel(config).eval()
    randomise(model, torch.Generator().manual_seed(3))
    shutil.rmtree(OUT, ignore_errors=True)
    mdir = os.path.join(OUT, "model")
    model.half().save_pretrained(mdir, safe_serialization=True)
    cfg_path = os.path.join(mdir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.pop("transformers_version", None)
    json.dump(cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(mdir)
    model = CLIPModel.from_pretrained(mdir, torch_dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)

    images = []
    pixels = {}
    for k, (w, h) in enumerate(SIZES):
        img = image(k, w, h)
        img.save(os.path.join(OUT, f"image_{k}.png"))
        images.append(img)
        pixels[f"image_{k}"] = processor(images=img, return_tensors="pt").pixel_values[0].float().contiguous()
    save_file(pixels, os.path.join(OUT, "pixels.safetensors"))

    with torch.no_grad():
        pv = torch.stack([pixels[f"image_{k}"] for k in range(len(SIZES))])
        img_emb = model.get_image_features(pixel_values=pv)
        img_emb = getattr(img_emb, "pooler_output", img_emb)
        ids = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        txt_emb = model.get_text_features(input_ids=ids.input_ids)
        txt_emb = getattr(txt_emb, "pooler_output", txt_emb)
    img_emb = img_emb / img_emb.norm(dim=-1, keepdim=True)
    txt_emb = txt_emb / txt_emb.norm(dim=-1, keepdim=True)
    clip_t = (100 * img_emb @ txt_emb.T).tolist()
    clip_i = (100 * img_emb @ img_emb.T).tolist()
    json.dump({"captions": CAPTIONS, "images": [f"image_{k}.png" for k in range(len(SIZES))],
               "clip_t": clip_t, "clip_i": clip_i}, open(os.path.join(OUT, "scores.json"), "w"), indent=1)
    print("clip_t", np.round(clip_t, 3).tolist())
    print("clip_i", np.round(clip_i, 3).tolist())
    print("wrote", OUT)


if __name__ == "__main__":
    main()
