#!/usr/bin/env python3
"""A StoryMaker-layout sample with a half-size mask, and what the reference's own dataset code
makes of it.

Writes tests/fixtures/storymaker_layout/, laid out as the reference's `examples/`:
  datasets/test.json            index keyed by person count; paths relative to the folder above
                                it (`datasets/001.png`, …), as the reference's own example
  datasets/001.png              301×203 RGB image (PNG: decoding is not what is tested here)
  datasets/001_mask.png         151×102 colour mask (half the image, as the reference's example):
                                character 0 blue, character 1 green
  datasets/001_pose.png         the pose image (the reference's loader always opens one)
  datasets/001_faceid/{0,1}.bin torch.save({'id': (1, 512) f32 normalised, 'kps': (5, 2) f32
                                relative to the character's crop})
  expected/                     from the reference's `MasktileDataset.help_realistic` (mp_dataset.py,
                                imported from a checkout of RedAIGC/StoryMaker), with the body
                                crop's rotation drawn as 0 and no conditioning dropout:
    mask_{i}.png   `cv2.inRange` of the resized colour mask (0/255), captured from the call
    gt.png         `image_gt` as the 8-bit image it normalises (the reference's training size)
    body_{i}.png   the body crops behind `clip_image` (224², before CLIP normalisation)
    face_{i}.png   the aligned face crops behind `clip_face`
    expected.safetensors:
      lefttop.{i}  (2,) f32: the crop origin `bounding_rectangle` returns
      kps_abs.{i}  (5, 2) f32: `face_kps + lefttop` (crop_refimg's `face_kps_abs`)
      mask_gt.{i}  (H'/8, W'/8) f32: `mask_gt[..., i]` (loss masks in [0, 1])
  The PNGs hold the reference's tensors exactly: each is checked here to normalise back to
  them (within 1e-6).

The dataset is built as train.sh configures it (`--resolution 960 --mask_loss_weight 5`). Shims,
none of which touch the computation: `pillow_heif` (an image-format plugin the module imports)
is stubbed; transformers 5's `CLIPImageProcessor` is its PIL variant (as in
make_pipeline_fixtures.py); the tokenizers are the tiny SDXL's. The environment is the pinned
one (OpenCV 5, Pillow 13): Troupe is run with `LibraryVersions::current()` against it.

Run: ~/.cache/troupe-pyref/bin/python scripts/make_storymaker_layout_fixtures.py --storymaker DIR
"""
import argparse
import os
import random
import sys
import types

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "tests/fixtures/storymaker_layout")
sys.path.insert(0, HERE)
from make_pipeline_fixtures import clip_processor_class  # noqa: E402

SIZE = (301, 203)
MASK_SIZE = (151, 102)
# (ellipse box in mask pixels, colour): character 0 blue, character 1 green (RGB).
CHARACTERS = [((12, 10, 70, 98), (0, 0, 255)), ((82, 6, 140, 96), (0, 255, 0))]
# Face keypoints relative to each character's crop.
KPS = [
    [[40.5, 45.25], [70.75, 44.5], [55.0, 60.125], [43.25, 78.0], [68.5, 77.75]],
    [[38.0, 40.5], [66.25, 41.75], [52.5, 57.0], [41.0, 72.25], [64.75, 73.5]],
]


def write_layout():
    d = os.path.join(OUT, "datasets")
    os.makedirs(os.path.join(d, "001_faceid"), exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = SIZE
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // w), (y * 255 // h), ((x // 7 + y // 5) * 37) % 256], -1).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(d, "001.png"))
    Image.fromarray(255 - img).save(os.path.join(d, "001_pose.png"))
    mask = Image.new("RGB", MASK_SIZE)
    draw = ImageDraw.Draw(mask)
    for box, colour in CHARACTERS:
        draw.ellipse(box, fill=colour)
    mask.save(os.path.join(d, "001_mask.png"))
    for i, kps in enumerate(KPS):
        e = torch.from_numpy(rng.standard_normal(512).astype(np.float32))
        e = (e / e.norm()).reshape(1, 512)
        torch.save({"id": e, "kps": torch.tensor(kps, dtype=torch.float32)},
                   os.path.join(d, "001_faceid", f"{i}.bin"))
    index = {"2": [["datasets/001.png", "datasets/001_pose.png", "datasets/001_mask.png",
                    "two people standing", 2, "datasets/001_faceid"]]}
    import json
    with open(os.path.join(d, "test.json"), "w") as f:
        json.dump(index, f)
    return index["2"][0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storymaker", required=True, help="checkout of RedAIGC/StoryMaker")
    a = ap.parse_args()
    stub = types.ModuleType("pillow_heif")
    stub.register_heif_opener = stub.register_avif_opener = lambda *x, **k: None
    sys.modules["pillow_heif"] = stub
    sys.path.insert(0, os.path.abspath(a.storymaker))
    import mp_dataset
    from transformers import CLIPTokenizer

    mp_dataset.CLIPImageProcessor = clip_processor_class()
    entry = write_layout()
    tiny = os.path.join(ROOT, "configs/tiny-sdxl")
    args = types.SimpleNamespace(resolution=960, hstack_ref=0, use_vseg=1, use_faceid=1, use_facekps=1,
                                 use_headseg=0, use_unnorm=0, drop_pose=1, add_anime=0, sort_person=0,
                                 mask_loss_weight=5, faceid_loss=0)
    ds = mp_dataset.MasktileDataset(args, CLIPTokenizer.from_pretrained(os.path.join(tiny, "tokenizer")),
                                    CLIPTokenizer.from_pretrained(os.path.join(tiny, "tokenizer_2")), istest=True)
    # Capture what the reference computes on the way: the colour masks and the crop origins.
    masks, origins = [], []
    in_range = mp_dataset.cv2.inRange

    def capture_in_range(*x):
        r = in_range(*x)
        masks.append(r.copy())
        return r

    bounding = ds.bounding_rectangle

    def capture_bounding(*x):
        r = bounding(*x)
        origins.append(r[3].reshape(2).copy())
        return r

    mp_dataset.cv2.inRange = capture_in_range
    ds.bounding_rectangle = capture_bounding
    random.uniform = lambda lo, hi: 0.0  # body crop rotation 0
    random.random = lambda: 0.99  # no conditioning dropout
    cwd = os.getcwd()
    os.chdir(OUT)  # the reference opens index paths from its working directory
    try:
        out = ds.help_realistic(entry)
    finally:
        os.chdir(cwd)
    assert out["drop_image_embed"] == 0 and len(masks) == 2 and len(origins) == 2
    exp = os.path.join(OUT, "expected")
    os.makedirs(exp, exist_ok=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)

    def png(t, name, unnormalise, normalise):
        u8 = torch.round(unnormalise(t.double()) * 255).clamp(0, 255).to(torch.uint8)
        back = normalise(u8.double() / 255)
        assert (back - t.double()).abs().max() < 1e-6, name
        Image.fromarray(u8.permute(1, 2, 0).numpy()).save(os.path.join(exp, name))

    png(out["image_gt"], "gt.png", lambda t: t * 0.5 + 0.5, lambda t: (t - 0.5) / 0.5)
    t = {}
    for i in range(2):
        Image.fromarray(masks[i]).save(os.path.join(exp, f"mask_{i}.png"))
        for key, name in [("clip_image", "body"), ("clip_face", "face")]:
            png(out[key][i], f"{name}_{i}.png", lambda t: t * std + mean, lambda t: (t - mean) / std)
        t[f"lefttop.{i}"] = torch.from_numpy(origins[i].astype(np.float32))
        t[f"kps_abs.{i}"] = torch.from_numpy((np.array(KPS[i], dtype=np.float32) + origins[i]).astype(np.float32))
        t[f"mask_gt.{i}"] = out["mask_gt"][..., i].float().contiguous()
    save_file(t, os.path.join(exp, "expected.safetensors"))
    print("wrote", OUT, "origins", [o.tolist() for o in origins])


if __name__ == "__main__":
    main()
