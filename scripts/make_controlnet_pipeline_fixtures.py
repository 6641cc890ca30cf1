#!/usr/bin/env python3
"""Generation with a pose ControlNet: a parity fixture from diffusers' own
`StableDiffusionXLControlNetPipeline` with the StoryMaker processors.

The pipeline is diffusers' SDXL ControlNet pipeline over configs/tiny-sdxl and the tiny pose
ControlNet configs/tiny-sdxl/controlnet (float32, CPU, UniPC from the scheduler config, as
infer.py). Its UNet carries the StoryMaker processors of the pipeline fixture's adapter.bin,
loaded by the reference's own `set_ip_adapter`, at ip/lora scale 0.8; and every UNet call gets
the image tokens the reference pipeline computed for case `one` of make_pipeline_fixtures.py
(`one.ip_tokens` in outputs.safetensors: unconditional rows first) appended after the text, as
StableDiffusionXLStoryMakerPipeline appends them. Everything else (prompt encoding, the control
image's preprocessing, the ControlNet call on both guidance branches with the text as its
context, the residuals, CFG, the sampler, the VAE) is diffusers' code.

Writes to crates/troupe-diffusion/tests/fixtures/pipeline/:
* pose.png                 a 160x128 pose image (twice the 80x64 output: the control image
                           processor's Lanczos resize runs)
* controlnet.json          the call's arguments
* controlnet.safetensors   pose.latents (initial, before init_noise_sigma), pose.step{i:02}
                           (latents after each step), pose.image (N,H,W,3 in [0,1])

Run (after make_pipeline_fixtures.py; needs the same checkout of RedAIGC/StoryMaker):
  ~/.cache/troupe-pyref/bin/python scripts/make_controlnet_pipeline_fixtures.py --storymaker DIR
"""
import argparse
import json
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_pipeline_fixtures as mpf  # noqa: E402

ARGS = dict(
    prompt="a photo of a person walking in a park",
    negative_prompt="bad quality, ugly",
    height=64,
    width=80,
    num_inference_steps=10,
    guidance_scale=7.5,
    controlnet_conditioning_scale=0.7,
    num_images_per_prompt=1,
)
LATENT_SEED = 103


def pose_image():
    """OpenPose-like limbs: coloured thick lines on black."""
    img = Image.new("RGB", (160, 128))
    d = ImageDraw.Draw(img)
    joints = [(80, 20), (80, 50), (55, 55), (105, 55), (45, 85), (115, 80), (70, 95), (92, 95), (65, 125),
              (97, 125)]
    limbs = [(0, 1), (1, 2), (1, 3), (2, 4), (3, 5), (1, 6), (1, 7), (6, 8), (7, 9)]
    colours = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (170, 255, 0), (0, 255, 0), (0, 255, 170), (0, 170, 255),
               (0, 0, 255), (170, 0, 255)]
    for (a, b), c in zip(limbs, colours):
        d.line([joints[a], joints[b]], fill=c, width=6)
    for x, y in joints:
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(255, 255, 255))
    return img


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storymaker", required=True, help="checkout of RedAIGC/StoryMaker")
    ap.add_argument("--out", default=mpf.OUT)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(mpf.THREADS)
    torch.use_deterministic_algorithms(True)

    psm, ip_adapter_faceid, Resampler = mpf.import_reference(args.storymaker)
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, UniPCMultistepScheduler
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    psm.faceid_plus = mpf.make_tiny_faceid_plus(
        ip_adapter_faceid.faceid_plus, ip_adapter_faceid.FacePerceiverResampler, Resampler
    )
    out = args.out
    adapter_path = os.path.join(out, "adapter.bin")
    sm = psm.StableDiffusionXLStoryMakerPipeline.from_pretrained(mpf.TINY, torch_dtype=torch.float32)
    sm.set_ip_adapter(adapter_path, num_tokens=20, lora_rank=mpf.ADAPTER["lora_rank"])
    sm.set_ip_adapter_scale(0.8, 0.8)

    controlnet = ControlNetModel.from_pretrained(os.path.join(mpf.TINY, "controlnet"), torch_dtype=torch.float32)
    pipe = StableDiffusionXLControlNetPipeline(
        vae=sm.vae, text_encoder=sm.text_encoder, text_encoder_2=sm.text_encoder_2, tokenizer=sm.tokenizer,
        tokenizer_2=sm.tokenizer_2, unet=sm.unet, controlnet=controlnet,
        scheduler=UniPCMultistepScheduler.from_config(sm.scheduler.config), add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    # The StoryMaker image tokens after the text of every UNet call (not the ControlNet's).
    ip_tokens = load_file(os.path.join(out, "outputs.safetensors"))["one.ip_tokens"]
    unet_forward = pipe.unet.forward

    def forward(sample, timestep, encoder_hidden_states, *a, **k):
        assert encoder_hidden_states.shape[0] == ip_tokens.shape[0]
        ehs = torch.cat([encoder_hidden_states, ip_tokens.to(encoder_hidden_states.dtype)], dim=1)
        return unet_forward(sample, timestep, ehs, *a, **k)

    pipe.unet.forward = forward

    pose = pose_image()
    pose.save(os.path.join(out, "pose.png"))
    pose = Image.open(os.path.join(out, "pose.png")).convert("RGB")
    n = ARGS["num_images_per_prompt"]
    gen = torch.Generator().manual_seed(LATENT_SEED)
    latents = torch.randn((n, 4, ARGS["height"] // 8, ARGS["width"] // 8), generator=gen)
    rec = mpf.Recorder()
    with torch.no_grad():
        image = pipe(**ARGS, image=pose, latents=latents.clone(), output_type="np",
                     callback_on_step_end=rec, callback_on_step_end_tensor_inputs=mpf.RECORDED).images
    tensors = {"pose.latents": latents.contiguous(), "pose.image": torch.from_numpy(np.ascontiguousarray(image))}
    for i, s in enumerate(rec.steps):
        tensors[f"pose.step{i:02}"] = s.contiguous()
    save_file(tensors, os.path.join(out, "controlnet.safetensors"))
    with open(os.path.join(out, "controlnet.json"), "w") as f:
        json.dump(dict(args=ARGS, pose="pose.png", references=["person_0"], latent_seed=LATENT_SEED,
                       ip_adapter_scale=0.8, lora_scale=0.8, controlnet="configs/tiny-sdxl/controlnet",
                       controlnet_context="text", scheduler="UniPCMultistepScheduler"), f, indent=2)
        f.write("\n")
    print("wrote", out, "image range", float(image.min()), float(image.max()))


if __name__ == "__main__":
    main()
