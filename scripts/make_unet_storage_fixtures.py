#!/usr/bin/env python3
"""The sd15_tiny UNet fixture (make_unet_fixtures.py) stored two more ways diffusers stores
weights, for troupe's loaders:

* sd15_tiny_sharded/  `save_pretrained(max_shard_size="40KB")`: several
                      diffusion_pytorch_model-0000i-of-0000n.safetensors and the index JSON.
* sd15_tiny_bf16/     the weights in bfloat16; io_even.safetensors holds the output computed with
                      those bf16-rounded weights upcast to float32 (what troupe computes when it
                      loads them as f32).

Both reuse sd15_tiny's io_even inputs.

Run: ~/.cache/troupe-pyref/bin/python scripts/make_unet_storage_fixtures.py
"""
import json
import os
import shutil

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates/troupe-models/tests/fixtures/unet")


def tidy(d):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg.pop("_diffusers_version", None)
    json.dump(cfg, open(path, "w"), indent=2, sort_keys=True)


def main():
    src = os.path.join(OUT, "sd15_tiny")
    unet = UNet2DConditionModel.from_pretrained(src).eval()
    io = load_file(os.path.join(src, "io_even.safetensors"))

    d = os.path.join(OUT, "sd15_tiny_sharded")
    shutil.rmtree(d, ignore_errors=True)
    unet.save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
    tidy(d)
    shards = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    assert len(shards) > 1, shards
    shutil.copy(os.path.join(src, "io_even.safetensors"), os.path.join(d, "io_even.safetensors"))

    d = os.path.join(OUT, "sd15_tiny_bf16")
    shutil.rmtree(d, ignore_errors=True)
    unet.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    tidy(d)
    unet = unet.float()
    inputs = {k: v for k, v in io.items() if k != "out"}
    with torch.no_grad():
        out = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
    save_file({**inputs, "out": out.contiguous()}, os.path.join(d, "io_even.safetensors"))
    print("wrote", d, "and the sharded copy", sorted(shards))


if __name__ == "__main__":
    main()
