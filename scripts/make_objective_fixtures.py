#!/usr/bin/env python3
"""Reference values of StoryMaker's losses (storymaker.md §5.2) for troupe-train's test.

Writes crates/troupe-train/tests/fixtures/objective.safetensors with two cases, both computed
by the reference's own code (below) per image, as the reference does (its batch size is 1,
train_storymaker.py:221), then averaged over the batch (Troupe's convention for B > 1).

* `small.*` keys: latent 8×8, B = 2 with 2 and 1 characters, nothing dropped.

* `real_res.*` keys: the training configuration. Latent 16×12 (H×W), masks at latent size as the
  reference's data set makes them (mp_dataset.py:125-126,326: image size // 8 when
  --mask_loss_weight > 0), B = 2 with 3 and 2 characters (the second sample's third mask slot is
  padding), 3 tokens per slot. The attention maps are given for every image cross-attention
  processor of the SDXL UNet, in `unet.attn_processors` order (70, from the SDXL config
  crates/troupe-models/tests/fixtures/flops/sdxl_config.json built on the meta device): the 10 at
  latent/2 (8×6; the reference skips them) and the 60 at latent/4 (4×3; the reference's `attn/60`
  averages over exactly these). Only the 60 go to the fixture (`real_res.layers`,
  [60, B, (1 + 3)·3, 4·3]); Troupe records only those layers.

  The values of this case come from the reference's own code, executed unmodified: the source of
  `get_loss_ip` (train_storymaker.py:617-677, a closure inside `main`) and of the noise-loss
  block `if args.snr_gamma is None: …` (train_storymaker.py:794-816, inline in the training loop)
  are taken from the checkout given with --storymaker (Python's `ast`, located by name and by
  condition) and executed with the names they read from `main` supplied: `args`
  (mask_loss_weight 5, snr_gamma None), `unet.attn_processors[name].attn_probs` (the
  head-averaged probabilities `(B, tokens, hw)` the processors store,
  ip_adapter/attention_processor.py:381-382), `ip_attn_names` (train_storymaker.py:503-520),
  `num_token = bg_tokens = 3` (train_storymaker.py:602-603 sets 20, StoryMaker's tokens per
  slot; the fixture uses 3), `batch`, `noise_pred`, `noise`, `weight_dtype = float32` (the
  reference trains in fp16/bf16; f32 here), and step 1 (so the step-%1000 debug dump does not
  run). So the mask resolution (bilinear ×½ of the latent-size masks, align_corners False), the
  upsampling of the 4×3 maps to the mask size, the token-slot sums, the /60 layer average and
  the reductions are the reference's lines, not our reading of them.

Run: ~/.cache/troupe-pyref/bin/python scripts/make_objective_fixtures.py --storymaker DIR
"""
import argparse
import ast
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "crates/troupe-train/tests/fixtures/objective.safetensors")


# ---------------------------------------------------------------------------------------------
# Real-resolution case (`real_res.*`): the reference's own code, executed.
# ---------------------------------------------------------------------------------------------
def reference_nodes(storymaker):
    """`get_loss_ip` and the `if args.snr_gamma is None:` noise-loss block of train_storymaker.py."""
    path = os.path.join(storymaker, "train_storymaker.py")
    tree = ast.parse(open(path).read(), filename=path)
    fns = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_loss_ip"]
    ifs = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "args.snr_gamma is None"]
    assert len(fns) == 1 and len(ifs) == 1, (len(fns), len(ifs))
    for n in fns + ifs:
        print(f"reference: train_storymaker.py:{n.lineno}-{n.end_lineno}")
    compile_ = lambda node: compile(ast.Module(body=[node], type_ignores=[]), path, "exec")  # noqa: E731
    return compile_(fns[0]), compile_(ifs[0])


def sdxl_ip_attn_names():
    """`ip_attn_names` (train_storymaker.py:503-520) for SDXL, with each processor's latent
    down-scale (down_blocks.i: 2^i, mid_block: 2^(n-1), up_blocks.i: 2^(n-1-i))."""
    from diffusers import UNet2DConditionModel

    config = json.load(open(os.path.join(ROOT, "crates/troupe-models/tests/fixtures/flops/sdxl_config.json")))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    n = len(unet.config.block_out_channels)
    out = []
    for name in unet.attn_processors.keys():
        if name.endswith("attn1.processor"):  # cross_attention_dim None: not an IP processor
            continue
        if name.startswith("mid_block"):
            level = n - 1
        elif name.startswith("up_blocks"):
            level = n - 1 - int(name[len("up_blocks.")])
        else:
            level = int(name[len("down_blocks.")])
        out.append((name, 2 ** level))
    return out


def reference_case(code, names, prefix, seed, H, W, chars, drop):
    """One batch (latent H×W, `chars[b]` characters and image dropout `drop[b]` per sample)
    through the reference's code; the keys start with `prefix`."""
    get_loss_ip_code, noise_block_code = code
    g = torch.Generator().manual_seed(seed)
    B, C, T = len(chars), max(chars), 3  # batch, character slots, tokens per slot
    pred, target = torch.randn(B, 4, H, W, generator=g), torch.randn(B, 4, H, W, generator=g)
    masks = torch.rand(B, C, H, W, generator=g)
    for b in range(B):
        masks[b, chars[b]:] = 0.0  # padded slots
    keep = torch.tensor([0.0 if d else 1.0 for d in drop])
    probs = {}
    for name, down in names:
        hw = (H // down) * (W // down)
        p = torch.softmax(torch.randn(B, (1 + C) * T, hw, generator=g), dim=1)
        for b in range(B):  # padded slots get no probability
            if chars[b] < C:
                p[b, (1 + chars[b]) * T:] = 0.0
                p[b] = p[b] / p[b].sum(0, keepdim=True)
        probs[name] = p
    quarter = [name for name, down in names if down == 4]
    assert len(quarter) == 60 and len(names) == 70, (len(quarter), len(names))

    noise_losses, attn_losses = [], []
    for b in range(B):
        n = chars[b]
        mask_gt = masks[b:b + 1, :n].permute(0, 2, 3, 1).contiguous()  # the data set's [1, H, W, n]
        # Noise loss: train_storymaker.py:794-816 with its inputs.
        env = {"F": F, "torch": torch, "args": SimpleNamespace(snr_gamma=None, mask_loss_weight=5.0),
               "batch": {"drop_image_embeds": [drop[b]], "masks_gt": mask_gt},
               "accelerator": SimpleNamespace(device="cpu"), "weight_dtype": torch.float32,
               "noise_pred": pred[b:b + 1], "noise": target[b:b + 1]}
        exec(noise_block_code, env)
        noise_losses.append(env["loss"])
        # Attention loss: get_loss_ip, train_storymaker.py:617-677, with the names it reads from main.
        unet = SimpleNamespace(attn_processors={
            name: SimpleNamespace(attn_probs=probs[name][b:b + 1, :(1 + n) * T]) for name, _ in names})
        env = {"F": F, "torch": torch, "math": math, "np": np, "os": os,
               "args": SimpleNamespace(mask_loss_weight=5.0, ip_attn_len=None),
               "unet": unet, "ip_attn_names": [name for name, _ in names], "num_token": T, "bg_tokens": T}
        exec(get_loss_ip_code, env)
        attn_losses.append(env["get_loss_ip"](mask_gt, 1, None))

    noise = torch.stack(noise_losses).mean()
    attn = torch.stack(attn_losses).mean()
    print(f"{prefix}: noise", noise.item(), "attn", attn.item(), "per image", [a.item() for a in attn_losses])
    out = {
        "pred": pred, "target": target, "masks": masks, "keep": keep,
        "characters": torch.tensor(chars, dtype=torch.float32),
        "layers": torch.stack([probs[name] for name in quarter]).contiguous(),
        "noise_loss": noise.reshape(1), "attn_loss": attn.reshape(1),
    }
    return {f"{prefix}.{k}": v for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storymaker", required=True, help="checkout of RedAIGC/StoryMaker (train_storymaker.py)")
    a = ap.parse_args()
    code, names = reference_nodes(a.storymaker), sdxl_ip_attn_names()
    # The training configuration: a non-square latent, 3 and 2 characters, one image dropped.
    tensors = reference_case(code, names, "real_res", 1, 16, 12, chars=[3, 2], drop=[False, True])
    # A square latent, 2 and 1 characters, nothing dropped.
    tensors.update(reference_case(code, names, "small", 2, 8, 8, chars=[2, 1], drop=[False, False]))
    save_file(tensors, OUT)
    print("wrote", os.path.normpath(OUT))


if __name__ == "__main__":
    main()
