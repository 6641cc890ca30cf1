#!/usr/bin/env python3
"""Generate diffusers ControlNetModel parity fixtures (tiny random weights) for troupe-models.

Writes to crates/troupe-models/tests/fixtures/controlnet/:

* sdxl_tiny/  an SDXL-layout ControlNet that fits the UNet of fixtures/unet/sdxl_tiny (same
              blocks, text_time embedding), conditioning embedding (4, 8, 8, 16): a pose at 8x the
              latent size, as in SDXL.
* sd15_bgr/   an SD 1.x-layout ControlNet (conv projections, no add embedding) whose
              conditioning image is BGR (`controlnet_conditioning_channel_order = "bgr"`).

Every weight is random, the zero-initialised convolutions included, so each residual is
non-zero and tests can fail. Each folder holds config.json + diffusion_pytorch_model.safetensors
(save_pretrained) and io_<case>.safetensors with the inputs named as
`troupe debug forward --component controlnet` reads them (`sample`, `timestep`,
`encoder_hidden_states`, `text_embeds`, `time_ids`, `controlnet_cond`, `conditioning_scale`) and
the outputs `down_block_res_samples.{i}` and `mid_block_res_sample`. The SDXL cases also store
`unet_out`: the sdxl_tiny UNet's output with those residuals added
(`down_block_additional_residuals`, `mid_block_additional_residual`).

Run: ~/.cache/troupe-pyref/bin/python scripts/make_controlnet_fixtures.py
"""

import os
import sys

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_unet_fixtures import SD15_TINY, SDXL_TINY, TEXT_TOKENS, randomise, save_model, unet_inputs  # noqa: E402
import make_unet_fixtures  # noqa: E402

ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "crates/troupe-models/tests/fixtures/controlnet")
UNET_DIR = os.path.join(ROOT, "crates/troupe-models/tests/fixtures/unet/sdxl_tiny")


def controlnet_config(unet_config, **extra):
    cfg = {k: v for k, v in unet_config.items() if k not in ("up_block_types", "out_channels", "sample_size")}
    cfg.update(extra)
    return cfg


def run(controlnet, io):
    added = None
    if "text_embeds" in io:
        added = {"text_embeds": io["text_embeds"], "time_ids": io["time_ids"]}
    with torch.no_grad():
        down, mid = controlnet(
            io["sample"], io["timestep"], encoder_hidden_states=io["encoder_hidden_states"],
            controlnet_cond=io["controlnet_cond"], conditioning_scale=float(io["conditioning_scale"][0]),
            added_cond_kwargs=added, return_dict=False)
    out = {f"down_block_res_samples.{i}": d.contiguous() for i, d in enumerate(down)}
    out["mid_block_res_sample"] = mid.contiguous()
    return out, (down, mid)


def case(controlnet, config, d, name, b, h, w, seq, scale, gen, unet=None):
    io = unet_inputs(config, b, h, w, seq, gen)
    io["controlnet_cond"] = torch.rand(b, 3, 8 * h, 8 * w, generator=gen)
    io["conditioning_scale"] = torch.tensor([scale])
    outs, (down, mid) = run(controlnet, io)
    if unet is not None:
        added = {"text_embeds": io["text_embeds"], "time_ids": io["time_ids"]}
        with torch.no_grad():
            outs["unet_out"] = unet(
                io["sample"], io["timestep"], io["encoder_hidden_states"], added_cond_kwargs=added,
                down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    tensors = {k: v.contiguous() for k, v in {**io, **outs}.items()}
    save_file(tensors, os.path.join(d, f"io_{name}.safetensors"))


def main():
    make_unet_fixtures.OUT = OUT  # save_model writes under OUT
    os.makedirs(OUT, exist_ok=True)

    gen = torch.Generator().manual_seed(11)
    unet = UNet2DConditionModel.from_pretrained(UNET_DIR).eval()
    cn = ControlNetModel(**controlnet_config(SDXL_TINY, conditioning_embedding_out_channels=(4, 8, 8, 16))).eval()
    randomise(cn, gen)
    d = save_model(cn, "sdxl_tiny")
    # Image tokens as the context (the reference's training), an even and an odd latent.
    case(cn, SDXL_TINY, d, "even", 2, 16, 16, 12, 0.7, gen, unet)
    case(cn, SDXL_TINY, d, "odd", 1, 14, 10, TEXT_TOKENS, 1.0, gen, unet)

    gen = torch.Generator().manual_seed(12)
    cn = ControlNetModel(**controlnet_config(
        SD15_TINY, conditioning_embedding_out_channels=(4, 8, 8, 8),
        controlnet_conditioning_channel_order="bgr")).eval()
    randomise(cn, gen)
    d = save_model(cn, "sd15_bgr")
    case(cn, SD15_TINY, d, "even", 2, 8, 8, 7, 0.5, gen)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
