#!/usr/bin/env python3
"""diffusers DDPMScheduler schedules for troupe-train's parity test.

Writes crates/troupe-diffusion/tests/fixtures/ddpm.json: for several scheduler configs, the config
and diffusers' `alphas_cumprod` (float32 values as exact decimal strings of their bits); and, at a
few timesteps, `add_noise(x0, noise, t)`, `get_velocity(x0, noise, t)` (the v-prediction target)
and `diffusers.training_utils.compute_snr` on a fixed x0 and noise (float32 bits).

Run: ~/.cache/troupe-pyref/bin/python scripts/make_ddpm_fixtures.py
"""
import json
import os
import struct

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

CONFIGS = {
    "sdxl": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "linear": dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    "zero_snr_v": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    "odd_short": dict(num_train_timesteps=37, beta_start=0.001, beta_end=0.03, beta_schedule="scaled_linear"),
}

def f32_bits(t):
    return [struct.unpack("<I", struct.pack("<f", float(a)))[0] for a in t.float().flatten().tolist()]


gen = torch.Generator().manual_seed(0)
X0 = torch.randn(8, generator=gen)
NOISE = torch.randn(8, generator=gen)
out = {}
for name, cfg in CONFIGS.items():
    s = DDPMScheduler(**cfg)
    bits = f32_bits(s.alphas_cumprod)
    n = cfg["num_train_timesteps"]
    ts = sorted({0, 1, n // 2, n - 2, n - 1})
    t = torch.tensor(ts)
    # One row per timestep: add_noise / get_velocity broadcast over the batch dimension.
    x0, noise = X0.expand(len(ts), 8).contiguous(), NOISE.expand(len(ts), 8).contiguous()
    out[name] = {
        "config": cfg, "alphas_cumprod_bits": bits, "timesteps": ts,
        "x0_bits": f32_bits(X0), "noise_bits": f32_bits(NOISE),
        "add_noise_bits": f32_bits(s.add_noise(x0, noise, t)),
        "velocity_bits": f32_bits(s.get_velocity(x0, noise, t)),
        "snr_bits": f32_bits(compute_snr(s, t)),
    }
path = os.path.join(os.path.dirname(__file__), "..", "crates/troupe-diffusion/tests/fixtures/ddpm.json")
json.dump(out, open(path, "w"))
print("wrote", path)
