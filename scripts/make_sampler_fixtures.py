#!/usr/bin/env python3
"""diffusers sampler trajectories for troupe-diffusion's sampler parity test.

For every sampler (UniPC, DDIM, Euler, Euler ancestral, DPM++ 2M) and several scheduler configs,
builds `Class.from_config(config)`, calls `set_timesteps(steps)`, starts from seeded Gaussian
noise times `init_noise_sigma` and runs the denoising loop with a stand-in model (the ε or v
that a fixed seeded target implies for the scaled input at t, plus seeded noise).

Writes, under crates/troupe-diffusion/tests/fixtures/:
  samplers.safetensors  float32 tensors of shape (1, 4, 4, 6), per case `{case}`:
                          `{case}.init`             the starting sample
                          `{case}.{i}.model_output` the model output at step i
                          `{case}.{i}.prev_sample`  what `step` returned at step i
                          `{case}.{i}.scaled`       `scale_model_input` at step i (only when
                                                    it is not the identity)
                          `{case}.{i}.noise`        the Gaussian noise `step` drew (Euler
                                                    ancestral only; recorded by wrapping the
                                                    scheduler module's `randn_tensor`)
  samplers.json         per case: sampler name, diffusers class, config, steps, timesteps,
                        init_noise_sigma, and whether `scaled` / `noise` tensors exist

Run: ~/.cache/troupe-pyref/bin/python scripts/make_sampler_fixtures.py
"""
import json
import os

import diffusers
import numpy as np
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "crates/troupe-diffusion/tests/fixtures")
SHAPE = (1, 4, 4, 6)

CLASSES = {
    "unipc": UniPCMultistepScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
}

# (a) The tiny test model's scheduler: a DDPMScheduler config (leading, offset 1, clip_sample).
TINY = json.load(open(os.path.join(ROOT, "configs/tiny-sdxl/scheduler/scheduler_config.json")))
# (b) SDXL base 1.0's scheduler_config.json.
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# (d) Zero terminal SNR with v-prediction and trailing spacing (arXiv 2305.08891).
ZSNR = {**SDXL, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True}

COMMON = [("tiny", TINY, 25), ("sdxl", SDXL, 25), ("sdxl_7", SDXL, 7), ("zsnr_v", ZSNR, 25)]
# (c) Karras sigmas, and each class's other implemented options (shorter runs).
EXTRA = {
    "unipc": [
        ("karras", {**SDXL, "use_karras_sigmas": True}, 25),
        # bh1 with a zero final σ gives NaN in diffusers (B(h) = −h = −∞, times 0): sigma_min.
        ("order3_bh1", {**SDXL, "solver_order": 3, "solver_type": "bh1", "disable_corrector": [2],
                        "timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"}, 10),
        ("eps_pred_min", {**SDXL, "predict_x0": False, "final_sigmas_type": "sigma_min",
                          "lower_order_final": False, "prediction_type": "v_prediction"}, 10),
        ("karras_range", {**SDXL, "use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 8.0,
                          "final_sigmas_type": "sigma_min"}, 9),
    ],
    "ddim": [
        ("linspace_range", {**TINY, "set_alpha_to_one": False, "timestep_spacing": "linspace",
                            "clip_sample_range": 0.5}, 10),
        ("defaults", {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012}, 10),
    ],
    "euler": [
        ("karras", {**SDXL, "use_karras_sigmas": True}, 25),
        ("linspace_min", {**SDXL, "timestep_spacing": "linspace",
                          "final_sigmas_type": "sigma_min"}, 10),
        ("karras_range_v", {**SDXL, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0,
                            "prediction_type": "v_prediction"}, 9),
    ],
    "euler-a": [
        # This diffusers' Euler ancestral has no Karras option: the field is ignored.
        ("karras_ignored", {**SDXL, "use_karras_sigmas": True}, 10),
        ("linspace", {**SDXL, "timestep_spacing": "linspace"}, 10),
    ],
    "dpmpp-2m": [
        ("karras", {**SDXL, "use_karras_sigmas": True}, 25),
        ("heun_min", {**SDXL, "solver_type": "heun", "final_sigmas_type": "sigma_min",
                      "timestep_spacing": "linspace"}, 10),
        ("order1_clipped", {**SDXL, "solver_order": 1, "lambda_min_clipped": -2.0,
                            "timestep_spacing": "linspace"}, 10),
        ("unipc_cfg_euler_final", {**SDXL, "solver_type": "bh2", "euler_at_final": True,
                                   "final_sigmas_type": "sigma_min",
                                   "lower_order_final": False}, 20),
        ("karras_hidden_range", {**SDXL, "use_karras_sigmas": True, "sigma_min": 0.05,
                                 "sigma_max": 8.0}, 9),
    ],
}


def stand_in_model(scheduler, scaled, t, target, gen):
    """A denoiser that knows the data is `target`: the ε or v it implies for the scaled
    (variance-preserving) input at t, plus seeded noise so that outputs vary. It keeps the
    trajectories at the unit scale of real latents."""
    ac = torch.from_numpy(np.interp([float(t)], np.arange(len(scheduler.alphas_cumprod)),
                                    scheduler.alphas_cumprod.double().numpy())).float()
    a, s = ac.sqrt(), (1 - ac).sqrt()
    eps = (scaled - a * target) / s + 0.1 * torch.randn(SHAPE, generator=gen)
    if scheduler.config.prediction_type == "v_prediction":
        return a * eps - s * target
    return eps


class NoiseRecorder:
    """Wraps the Euler ancestral module's `randn_tensor` to keep what `step` drew."""

    def __init__(self):
        self.drawn = []
        self.original = euler_a_module.randn_tensor

    def __call__(self, *args, **kwargs):
        noise = self.original(*args, **kwargs)
        self.drawn.append(noise.clone())
        return noise


def run_case(name, sampler, config, steps, seed, tensors):
    """Runs one sampler × config, adding its tensors to `tensors`; returns its metadata."""
    scheduler = CLASSES[sampler].from_config(config)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    sigma0 = scheduler.init_noise_sigma
    x = torch.randn(SHAPE, generator=gen) * sigma0
    target = 0.8 * torch.randn(SHAPE, generator=gen)
    tensors[f"{name}.init"] = x.clone()
    recorder = NoiseRecorder()
    euler_a_module.randn_tensor = recorder
    identity = True
    step_gen = torch.Generator().manual_seed(seed + 1)
    try:
        for i, t in enumerate(scheduler.timesteps):
            scaled = scheduler.scale_model_input(x, t)
            identity = identity and torch.equal(scaled, x)
            out = stand_in_model(scheduler, scaled, t, target, gen)
            prev = scheduler.step(out, t, x, generator=step_gen).prev_sample \
                if sampler == "euler-a" else scheduler.step(out, t, x).prev_sample
            assert prev.dtype == torch.float32
            tensors[f"{name}.{i}.scaled"] = scaled.clone()
            tensors[f"{name}.{i}.model_output"] = out.clone()
            tensors[f"{name}.{i}.prev_sample"] = prev.clone()
            x = prev
    finally:
        euler_a_module.randn_tensor = recorder.original
    n = len(scheduler.timesteps)
    if identity:
        for i in range(n):
            del tensors[f"{name}.{i}.scaled"]
    assert len(recorder.drawn) == (n if sampler == "euler-a" else 0), name
    for i, noise in enumerate(recorder.drawn):
        tensors[f"{name}.{i}.noise"] = noise
    return {
        "sampler": sampler,
        "class": CLASSES[sampler].__name__,
        "config": config,
        "steps": steps,
        "timesteps": [float(t) for t in scheduler.timesteps.float().tolist()],
        "timesteps_integer": not scheduler.timesteps.is_floating_point(),
        "init_noise_sigma": float(sigma0),
        "has_scaled": not identity,
        "has_noise": sampler == "euler-a",
    }


def main():
    tensors, cases = {}, {}
    seed = 1000
    for sampler in CLASSES:
        for label, config, steps in COMMON + EXTRA[sampler]:
            name = f"{sampler}.{label}"
            seed += 17
            cases[name] = run_case(name, sampler, config, steps, seed, tensors)
    tensors = {k: v.contiguous().float() for k, v in tensors.items()}
    # No safetensors metadata: its key order is not stable, and samplers.json has the versions.
    save_file(tensors, os.path.join(OUT, "samplers.safetensors"))
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "cases": cases}
    with open(os.path.join(OUT, "samplers.json"), "w") as f:
        json.dump(meta, f, indent=1)
    files = ("samplers.safetensors", "samplers.json")
    size = sum(os.path.getsize(os.path.join(OUT, f)) for f in files)
    print(f"wrote {len(cases)} cases, {len(tensors)} tensors, {size / 1e3:.0f} kB to {OUT}")


if __name__ == "__main__":
    main()
