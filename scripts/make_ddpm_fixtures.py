#!/usr/bin/env python3
"""diffusers DDPMScheduler schedules for troupe-train's parity test.

Writes crates/troupe-diffusion/tests/fixtures/ddpm.json: for several scheduler configs, the config
and diffusers' `alphas_cumprod` (float32 values as exact decimal strings of their bits).

Run: ~/.cache/troupe-pyref/bin/python scripts/make_ddpm_fixtures.py
"""
import json
import os
import struct

from diffusers import DDPMScheduler

CONFIGS = {
    "sdxl": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "linear": dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    "zero_snr_v": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    "odd_short": dict(num_train_timesteps=37, beta_start=0.001, beta_end=0.03, beta_schedule="scaled_linear"),
}

out = {}
for name, cfg in CONFIGS.items():
    s = DDPMScheduler(**cfg)
    bits = [struct.unpack("<I", struct.pack("<f", float(a)))[0] for a in s.alphas_cumprod.float().tolist()]
    out[name] = {"config": cfg, "alphas_cumprod_bits": bits}
path = os.path.join(os.path.dirname(__file__), "..", "crates/troupe-diffusion/tests/fixtures/ddpm.json")
json.dump(out, open(path, "w"))
print("wrote", path)
