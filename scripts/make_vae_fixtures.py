#!/usr/bin/env python3
"""Generate diffusers AutoencoderKL parity fixtures (tiny random weights) for troupe-models.

Writes to crates/troupe-models/tests/fixtures/vae/:

* kl_2block/      block_out_channels (8, 16), layers_per_block 1: latents at 1/2 resolution.
* kl_2block_f16/  the kl_2block weights saved as float16; outputs computed with those
                  f16-rounded weights upcast to f32 (what troupe does when it loads them as f32).
* kl_3block/      (8, 16, 16), layers_per_block 2 (3 resnets per decoder block), 1/4 resolution.
* kl_4block_bare/ (8, 8, 8, 8), layers_per_block 1: the real 1/8 downscale, with the options
                  SD 1.x/SDXL leave at their defaults switched: no mid-block attention, no
                  quant_conv / post_quant_conv, a shift_factor; also a non-square input.

Each folder holds config.json + diffusion_pytorch_model.safetensors (save_pretrained) and
io.safetensors:

* `pixel_values` [2, 3, 32, 32] in [-1, 1] -> `latent_mean` and `logvar` (clamped) of
  `vae.encode(x).latent_dist`;
* `noise` and `latent_sample`: `latent_dist.sample(generator)` with `noise` the draw that
  generator makes (diffusers' `mean + std * noise`);
* `latents` [2, 4, 4, 4] -> `sample` = `vae.decode(latents).sample`;
* kl_4block_bare only: `pixel_values_rect` [1, 3, 24, 40] -> `latent_mean_rect`.

Every parameter is random, GroupNorm scales and shifts included, so a mis-wired norm fails.

Run: ~/.cache/troupe-pyref/bin/python scripts/make_vae_fixtures.py
"""

import json
import math
import os
import shutil

import torch
from diffusers import AutoencoderKL
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates/troupe-models/tests/fixtures/vae")

COMMON = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)

KL_2BLOCK = dict(
    COMMON,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
)

KL_3BLOCK = dict(
    COMMON,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    scaling_factor=0.13025,
)

KL_4BLOCK_BARE = dict(
    COMMON,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)


def randomise(model, gen):
    """Non-trivial values everywhere (norm scales/shifts and biases too), so tests can fail."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def save_model(vae, name):
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    vae.save_pretrained(d, safe_serialization=True)
    # Keep the committed config minimal and stable: drop diffusers' bookkeeping keys.
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg.pop("_diffusers_version", None)
    json.dump(cfg, open(path, "w"), indent=2, sort_keys=True)
    return d


def make_io(gen):
    """Inputs shared by every model: images in [-1, 1] and unit-normal latents."""
    return {
        "pixel_values": torch.rand((2, 3, 32, 32), generator=gen) * 2 - 1,
        "latents": torch.randn((2, 4, 4, 4), generator=gen),
    }


def run(vae, io, sample_seed):
    out = dict(io)
    with torch.no_grad():
        dist = vae.encode(io["pixel_values"]).latent_dist
        out["latent_mean"] = dist.mean
        out["logvar"] = dist.logvar
        # diffusers' own sampling path, and the noise its generator draws for it.
        out["latent_sample"] = dist.sample(torch.Generator().manual_seed(sample_seed))
        out["noise"] = randn_tensor(dist.mean.shape, generator=torch.Generator().manual_seed(sample_seed))
        out["sample"] = vae.decode(io["latents"]).sample
        if "pixel_values_rect" in io:
            out["latent_mean_rect"] = vae.encode(io["pixel_values_rect"]).latent_dist.mean
    return out


def save_io(d, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "io.safetensors"))


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)

    gen = torch.Generator().manual_seed(11)
    vae = AutoencoderKL(**KL_2BLOCK).eval()
    randomise(vae, gen)
    d = save_model(vae, "kl_2block")
    io = make_io(gen)
    save_io(d, run(vae, io, 101))

    d16 = save_model(vae.half(), "kl_2block_f16")
    vae = vae.float()  # f16-rounded weights, computed in f32
    save_io(d16, run(vae, io, 101))

    gen = torch.Generator().manual_seed(12)
    vae = AutoencoderKL(**KL_3BLOCK).eval()
    randomise(vae, gen)
    d = save_model(vae, "kl_3block")
    save_io(d, run(vae, make_io(gen), 102))

    gen = torch.Generator().manual_seed(13)
    vae = AutoencoderKL(**KL_4BLOCK_BARE).eval()
    randomise(vae, gen)
    d = save_model(vae, "kl_4block_bare")
    io = make_io(gen)
    io["pixel_values_rect"] = torch.rand((1, 3, 24, 40), generator=gen) * 2 - 1
    save_io(d, run(vae, io, 103))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
