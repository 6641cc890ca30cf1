#!/usr/bin/env python3
"""FLOP-count fixtures for troupe-models' `UNet2DConditionConfig::forward_flops`: PyTorch's own
`torch.utils.flop_counter.FlopCounterMode` over one forward pass of the diffusers
UNet2DConditionModel, plain and with the StoryMaker processors of scripts/make_unet_fixtures.py
(LoRA on every attention projection, decoupled image attention with explicit probabilities).

Models are built on the `meta` device: shapes only, no weights and no arithmetic, so the real
SDXL config is counted on any machine in seconds.

Cases (written to crates/troupe-models/tests/fixtures/flops/flops.json):
* tiny: configs/tiny-sdxl/unet/config.json, batch 2, latent 8 × 8, 77 text tokens; plain and
  with processors (rank 4, 32 image tokens).
* sdxl: stabilityai/stable-diffusion-xl-base-1.0's unet/config.json values (written below;
  sdxl_config.json beside the counts), batch 1, latent 128 × 128 (1024² images), 77 text
  tokens; plain and with processors (rank 128, 32 image tokens: one character, 16 per slot).

Run: ~/.cache/troupe-pyref/bin/python scripts/make_flops_fixtures.py
"""
import json
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import make_unet_fixtures as M  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

OUT = os.path.join(ROOT, "crates/troupe-models/tests/fixtures/flops")

SDXL = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}


def count(config, b, h, w, rank, image_tokens):
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).eval()
        if rank:
            M.randomise = lambda *a, **k: None  # meta tensors hold no values
            M.attach_processors(unet, rank, 1.0, 1.0, None)
        io = M.unet_inputs(config, b, h, w, M.TEXT_TOKENS + image_tokens, None)
    io = {k: v.to("meta") for k, v in io.items()}
    added = {"text_embeds": io.pop("text_embeds"), "time_ids": io.pop("time_ids")} if "text_embeds" in io else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(io["sample"], io["timestep"], io["encoder_hidden_states"], added_cond_kwargs=added)
    return counter.get_total_flops()


def main():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(ROOT, "configs/tiny-sdxl/unet/config.json")) as f:
        tiny = json.load(f)
    with open(os.path.join(OUT, "sdxl_config.json"), "w") as f:
        json.dump(SDXL, f, indent=1)
    cases = []
    for name, config, b, h, w, rank, image in [
        ("tiny", tiny, 2, 8, 8, 0, 0), ("tiny", tiny, 2, 8, 8, 4, 32),
        ("sdxl", SDXL, 1, 128, 128, 0, 0), ("sdxl", SDXL, 1, 128, 128, 128, 32),
    ]:
        flops = count(config, b, h, w, rank, image)
        cases.append({"config": name, "batch": b, "height": h, "width": w, "text_tokens": M.TEXT_TOKENS,
                      "image_tokens": image, "lora_rank": rank, "flops": flops})
        print(cases[-1])
    with open(os.path.join(OUT, "flops.json"), "w") as f:
        json.dump({"torch": torch.__version__, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main()
