#!/usr/bin/env python3
"""StoryMaker-layout samples (a half-size mask and a full-size one), and what the reference's own
dataset code makes of them.

Writes tests/fixtures/storymaker_layout/, laid out as the reference's `examples/`:
  datasets/test.json            index keyed by person count; paths relative to the folder above
                                it (`datasets/001.png`, …), as the reference's own example
  datasets/001.png              301×203 RGB image, two characters, with
  datasets/001_mask.png         a 151×102 colour mask (half the image, as the reference's
                                example): character 0 blue, character 1 green
  datasets/002.png              214×297 RGB image, three characters (the third touches the right
  datasets/002_mask.png         and bottom edges, so the crop box is clipped), full-size mask
  datasets/<id>_pose.png        the pose image (the reference's loader always opens one)
  datasets/<id>_faceid/{i}.bin  torch.save({'id': (1, 512) f32 normalised, 'kps': (5, 2) f32
                                relative to the character's crop})
  expected/<id>/                from the reference's `MasktileDataset.help_realistic` (mp_dataset.py,
                                imported from a checkout of RedAIGC/StoryMaker), with the body
                                crop's rotation drawn as 0 and no conditioning dropout; named as
                                `troupe data preview --dump` names its files:
    stored_mask_{i}.png  `cv2.inRange` of the resized colour mask (0/255), captured from the call
    gt.png         `image_gt` as the 8-bit image it normalises (the reference's training size)
    pose.png       `image_ref` (the pose resized to the training size) as 8-bit
    body_{i}.png   the body crops behind `clip_image` (224², before CLIP normalisation)
    face_{i}.png   the aligned face crops behind `clip_face`
    expected.safetensors:
      box.{i}      (4,) f32: the crop box x0, y0, x1, y1 (exclusive) `bounding_rectangle` cuts
      kps_abs.{i}  (5, 2) f32: `face_kps + lefttop` (crop_refimg's `face_kps_abs`)
      kps.{i}      (5, 2) f32: the `.bin` keypoints (relative to the crop)
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

BLUE, GREEN, RED = (0, 0, 255), (0, 255, 0), (255, 0, 0)
# Each entry: image size, mask size, (ellipse box in mask pixels, colour) per character in slot
# order, and face keypoints relative to each character's crop.
ENTRIES = {
    "001": dict(
        size=(301, 203), mask_size=(151, 102), caption="two people standing",
        characters=[((12, 10, 70, 98), BLUE), ((82, 6, 140, 96), GREEN)],
        kps=[
            [[40.5, 45.25], [70.75, 44.5], [55.0, 60.125], [43.25, 78.0], [68.5, 77.75]],
            [[38.0, 40.5], [66.25, 41.75], [52.5, 57.0], [41.0, 72.25], [64.75, 73.5]],
        ]),
    "002": dict(
        size=(214, 297), mask_size=(214, 297), caption="three friends at the beach",
        characters=[((5, 40, 75, 250), BLUE), ((72, 30, 142, 260), GREEN), ((140, 50, 213, 296), RED)],
        kps=[
            [[22.5, 35.25], [50.75, 34.5], [36.0, 50.125], [25.25, 66.0], [48.5, 65.75]],
            [[24.0, 30.5], [52.25, 31.75], [38.5, 47.0], [27.0, 62.25], [50.75, 63.5]],
            [[20.25, 28.0], [49.5, 29.25], [35.75, 44.5], [23.5, 60.75], [47.0, 61.0]],
        ]),
}


def write_layout():
    """Writes datasets/; returns each entry as the index lists it, keyed by id."""
    d = os.path.join(OUT, "datasets")
    rng = np.random.default_rng(0)
    index, rows = {}, {}
    for sid, e in ENTRIES.items():
        os.makedirs(os.path.join(d, f"{sid}_faceid"), exist_ok=True)
        w, h = e["size"]
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([(x * 255 // w), (y * 255 // h), ((x // 7 + y // 5) * 37) % 256], -1).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{sid}.png"))
        Image.fromarray(255 - img).save(os.path.join(d, f"{sid}_pose.png"))
        mask = Image.new("RGB", e["mask_size"])
        draw = ImageDraw.Draw(mask)
        for box, colour in e["characters"]:
            draw.ellipse(box, fill=colour)
        mask.save(os.path.join(d, f"{sid}_mask.png"))
        for i, kps in enumerate(e["kps"]):
            v = torch.from_numpy(rng.standard_normal(512).astype(np.float32))
            v = (v / v.norm()).reshape(1, 512)
            torch.save({"id": v, "kps": torch.tensor(kps, dtype=torch.float32)},
                       os.path.join(d, f"{sid}_faceid", f"{i}.bin"))
        n = len(e["characters"])
        rows[sid] = [f"datasets/{sid}.png", f"datasets/{sid}_pose.png", f"datasets/{sid}_mask.png",
                     e["caption"], n, f"datasets/{sid}_faceid"]
        index.setdefault(str(n), []).append(rows[sid])
    import json
    with open(os.path.join(d, "test.json"), "w") as f:
        json.dump(index, f)
    return rows


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
    rows = write_layout()
    tiny = os.path.join(ROOT, "configs/tiny-sdxl")
    args = types.SimpleNamespace(resolution=960, hstack_ref=0, use_vseg=1, use_faceid=1, use_facekps=1,
                                 use_headseg=0, use_unnorm=0, drop_pose=1, add_anime=0, sort_person=0,
                                 mask_loss_weight=5, faceid_loss=0)
    ds = mp_dataset.MasktileDataset(args, CLIPTokenizer.from_pretrained(os.path.join(tiny, "tokenizer")),
                                    CLIPTokenizer.from_pretrained(os.path.join(tiny, "tokenizer_2")), istest=True)
    # Capture what the reference computes on the way: the colour masks and the crop boxes.
    masks, boxes = [], []
    in_range = mp_dataset.cv2.inRange

    def capture_in_range(*x):
        r = in_range(*x)
        masks.append(r.copy())
        return r

    bounding = ds.bounding_rectangle

    def capture_bounding(*x):
        r = bounding(*x)
        (x0, y0), (h, w) = r[3].reshape(2), r[0].shape[:2]
        boxes.append(np.array([x0, y0, x0 + w, y0 + h]))
        return r

    mp_dataset.cv2.inRange = capture_in_range
    ds.bounding_rectangle = capture_bounding
    random.uniform = lambda lo, hi: 0.0  # body crop rotation 0
    random.random = lambda: 0.99  # no conditioning dropout
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    cwd = os.getcwd()
    for sid, entry in rows.items():
        masks.clear()
        boxes.clear()
        os.chdir(OUT)  # the reference opens index paths from its working directory
        try:
            out = ds.help_realistic(entry)
        finally:
            os.chdir(cwd)
        n = entry[4]
        assert out["drop_image_embed"] == 0 and len(masks) == n and len(boxes) == n
        exp = os.path.join(OUT, "expected", sid)
        os.makedirs(exp, exist_ok=True)

        def png(t, name, unnormalise, normalise):
            u8 = torch.round(unnormalise(t.double()) * 255).clamp(0, 255).to(torch.uint8)
            back = normalise(u8.double() / 255)
            assert (back - t.double()).abs().max() < 1e-6, name
            Image.fromarray(u8.permute(1, 2, 0).numpy()).save(os.path.join(exp, name))

        png(out["image_gt"], "gt.png", lambda t: t * 0.5 + 0.5, lambda t: (t - 0.5) / 0.5)
        png(out["image_ref"], "pose.png", lambda t: t, lambda t: t)
        t = {}
        for i in range(n):
            Image.fromarray(masks[i]).save(os.path.join(exp, f"stored_mask_{i}.png"))
            for key, name in [("clip_image", "body"), ("clip_face", "face")]:
                png(out[key][i], f"{name}_{i}.png", lambda t: t * std + mean, lambda t: (t - mean) / std)
            kps = np.array(ENTRIES[sid]["kps"][i], dtype=np.float32)
            t[f"box.{i}"] = torch.from_numpy(boxes[i].astype(np.float32))
            t[f"kps.{i}"] = torch.from_numpy(kps)
            t[f"kps_abs.{i}"] = torch.from_numpy((kps + boxes[i][:2]).astype(np.float32))
            t[f"mask_gt.{i}"] = out["mask_gt"][..., i].float().contiguous()
        save_file(t, os.path.join(exp, "expected.safetensors"))
        print("wrote", exp, "boxes", [b.tolist() for b in boxes])


if __name__ == "__main__":
    main()
