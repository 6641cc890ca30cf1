#!/usr/bin/env python3
"""Seconds per training step: troupe vs the same step in PyTorch, same shapes, same threads,
measured in one run.

The PyTorch step is the StoryMaker step written from the reference (storymaker.md §2, §5) on the
same diffusers/transformers components troupe trains with: VAE posterior sample, both text
encoders (penultimate states), the CLIP image encoder on every character slot's body and face
crops, the PPR (faceid_plus, from scripts/make_ppr_fixtures.py), the UNet with the reference
LoRA / decoupled-IP processors (from scripts/make_unet_fixtures.py, attention maps recorded),
region-weighted noise MSE + attention loss, backward, AdamW. troupe's time is `step_s` from its
metrics (compute only: waiting for the data loader is excluded), median over the timed steps.

Configs: `tiny` = configs/tiny.toml as is (64 px images, 8×8 latents); `mid` = the same
pipeline with a UNet of 64/128/128 channels and 64-wide heads at 128 px (16×16 latents).

`--controlnet` times each config twice more, with a frozen pose ControlNet of the UNet's layout
(tiny: configs/tiny-sdxl/controlnet; mid: `ControlNetModel.from_unet` of the mid UNet) fed a
pose at the image's size and, as StoryMaker's training script does, the PPR image tokens; its
residuals go into the UNet. troupe trains on a synthetic dataset where every row has a pose
(`troupe data synth --pose-fraction 1`), so the ControlNet runs on every sample in both.

Run (after `cargo build --release -p troupe-cli`):
    ~/.cache/troupe-pyref/bin/python scripts/bench_train.py [--threads 2] [--steps 12] [--controlnet]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import make_ppr_fixtures as P  # noqa: E402
from make_unet_fixtures import LoRAAttnProcessor, LoRAIPAttnProcessor, processor_hidden_size  # noqa: E402
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection  # noqa: E402

B, C, N_CHARS, RANK = 2, 3, 2, 8  # batch, character slots, characters per image, LoRA rank


def storymaker_loss(pred, noise, masks, attn_layers, n_chars, tokens_per_slot=20):
    """Region-weighted noise MSE (weight 5) + 0.1 × the attention-map loss over `attn_layers`
    (LoRAIPAttnProcessor modules holding `attn_probs` (B, N_ip, hw) of square layers)."""
    b = pred.shape[0]
    region = masks[:, :n_chars].sum(1, keepdim=True).clamp(0, 1)
    e = (pred.float() - noise.float()) ** 2
    loss = (e + 5 * e * region).mean()
    attn = 0
    for m in attn_layers:
        pr = m.attn_probs  # (B, N_ip, hw)
        side = int(pr.shape[-1] ** 0.5)
        a = F.interpolate(pr.reshape(b, -1, side, side), size=(2 * side, 2 * side), mode="bilinear")
        slots = a.reshape(b, 1 + n_chars, tokens_per_slot, 2 * side, 2 * side).sum(2)
        mm = F.interpolate(masks[:, :n_chars], size=(2 * side, 2 * side), mode="bilinear")
        attn = attn + ((slots[:, 1:] - mm) ** 2).mean()
    return loss + 0.1 * attn / max(len(attn_layers), 1)


def torch_step_time(base, res, steps, warmup, controlnet=False):
    dev = "cpu"
    unet = UNet2DConditionModel.from_pretrained(os.path.join(base, "unet"), torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(os.path.join(base, "vae"), torch_dtype=torch.float32)
    te1 = CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder"), torch_dtype=torch.float32)
    te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(base, "text_encoder_2"), torch_dtype=torch.float32)
    enc = CLIPVisionModelWithProjection.from_pretrained(os.path.join(base, "image_encoder"), torch_dtype=torch.float32)
    cn = ControlNetModel.from_pretrained(os.path.join(base, "controlnet"), torch_dtype=torch.float32) \
        if controlnet else None
    for m in (unet, vae, te1, te2, enc, cn):
        if m is not None:
            m.requires_grad_(False)
    cfg = unet.config
    procs, mods = {}, []
    for name in unet.attn_processors.keys():
        h = processor_hidden_size(cfg, name)
        p = LoRAAttnProcessor(h, None, RANK, 1.0) if name.endswith("attn1.processor") else \
            LoRAIPAttnProcessor(h, cfg.cross_attention_dim, RANK, 1.0, 1.0)
        procs[name] = p
        mods.append(p)
    unet.set_attn_processor(procs)
    P.CROSS_DIM, P.ID_DIM, P.CLIP_DIM = cfg.cross_attention_dim, 512, enc.config.hidden_size
    P.NUM_TOKENS, P.NUM_QUERIES, P.DEPTH, P.DIM_HEAD, P.FF_MULT, P.MAX_CHARS = 4, 16, 1, 8, 4, 3
    ppr = P.FaceIdPlus()
    params = list(ppr.parameters()) + [p for m in mods for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    s = enc.config.image_size
    lat = res // 8
    attn_layers = [m for n, m in procs.items() if isinstance(m, LoRAIPAttnProcessor) and n.startswith(("down_blocks.2", "mid", "up_blocks.0"))]
    times = []
    for i in range(warmup + steps):
        pixels = torch.rand(B, 3, res, res) * 2 - 1
        ids = torch.randint(0, 49407, (B, 77))
        crops = torch.randn(B * C, 3, s, s)
        faces = torch.randn(B * C, 3, s, s)
        idv = torch.randn(B, C, 512)
        masks = torch.rand(B, C, lat, lat)
        pose = torch.rand(B, 3, res, res)
        t0 = time.perf_counter()
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
            o2 = te2(ids, output_hidden_states=True)
            text = torch.cat([h1, o2.hidden_states[-2]], -1)
            pooled = o2.text_embeds
            cc = enc(crops, output_hidden_states=True).hidden_states[-2]
            fc = enc(faces, output_hidden_states=True).hidden_states[-2]
        toks = []
        for b in range(B):
            sl = slice(b * C, b * C + N_CHARS)
            toks.append(ppr(idv[b, :N_CHARS], cc[sl], fc[sl]).reshape(1, -1, cfg.cross_attention_dim))
        ip = torch.cat(toks)
        ehs = torch.cat([text, ip], 1)
        noise = torch.randn_like(latents) + 0.05 * torch.randn(B, latents.shape[1], 1, 1)
        t = torch.randint(0, 1000, (B,))
        ac = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        ac = torch.cumprod(1 - ac, 0)[t].view(B, 1, 1, 1)
        noisy = ac.sqrt() * latents + (1 - ac).sqrt() * noise
        time_ids = torch.tensor([[res, res, 0, 0, res, res]] * B, dtype=torch.float32)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        residuals = {}
        if cn is not None:  # train_storymaker.py: the image tokens are the ControlNet's context
            down, mid = cn(noisy, t, encoder_hidden_states=ip, controlnet_cond=pose, added_cond_kwargs=added,
                           return_dict=False)
            residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        pred = unet(noisy, t, ehs, added_cond_kwargs=added, **residuals).sample
        loss = storymaker_loss(pred, noise, masks, attn_layers, N_CHARS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def troupe_step_time(exe, base, res, steps, warmup, threads, tmp, posed=None):
    """`posed`: a dataset where every row has a pose; trains with `base`/controlnet on it."""
    run = os.path.join(tmp, f"run-{res}-{'pose' if posed else 'plain'}")
    cmd = [exe, "train", "--config", os.path.join(ROOT, "configs/tiny.toml"), "--set", f"run.dir={run}",
           "--set", f"model.base={base}", "--set", f"model.image_encoder={base}/image_encoder",
           "--set", f"data.resolution={res}", "--set", f"train.max_steps={warmup + steps}",
           "--set", "data.workers=1", "--set", f"checkpoint.every_steps={warmup + steps}"]
    if posed:
        cmd += ["--set", f'model.controlnet="{base}/controlnet"', "--set", f'data.shards=["{posed}"]']
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, RAYON_NUM_THREADS=str(threads)))
    lines = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    return statistics.median(l["step_s"] for l in lines[warmup:])


def write_mid_sdxl(tiny, dst):
    """`tiny` (an SDXL folder) copied to `dst` with a bigger random UNet (64/128/128 channels,
    2 layers per block, torch seed 0): the `mid` config of the benchmarks. Returns `dst`."""
    shutil.copytree(tiny, dst)
    shutil.rmtree(os.path.join(dst, "unet"))
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=16, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(64, 128, 128),
        layers_per_block=2, transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 2, 2),
        use_linear_projection=True, cross_attention_dim=32, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=32,
    ).save_pretrained(os.path.join(dst, "unet"))
    shutil.rmtree(os.path.join(dst, "controlnet"))
    unet = UNet2DConditionModel.from_pretrained(os.path.join(dst, "unet"))
    ControlNetModel.from_unet(unet).save_pretrained(os.path.join(dst, "controlnet"))
    return dst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--controlnet", action="store_true", help="also time the step with a pose ControlNet")
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ap.add_argument("--troupe", default=os.path.join(target, "release", "troupe"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tiny = os.path.join(ROOT, "configs/tiny-sdxl")
    with tempfile.TemporaryDirectory() as tmp:
        mid = write_mid_sdxl(tiny, os.path.join(tmp, "mid-sdxl"))
        posed = None
        if a.controlnet:
            posed = os.path.join(tmp, "posed")
            subprocess.run([a.troupe, "data", "synth", "--out", posed, "--pose-fraction", "1"], cwd=ROOT,
                           check=True, capture_output=True)
        for name, base, res in [("tiny", tiny, 64), ("mid", mid, 128)]:
            plain = None
            for cn in [False, True] if a.controlnet else [False]:
                pt = torch_step_time(base, res, a.steps, a.warmup, cn)
                tr = troupe_step_time(a.troupe, base, res, a.steps, a.warmup, a.threads, tmp, posed if cn else None)
                label = f"{name}{' + ControlNet' if cn else ''}"
                extra = f"; ControlNet cost: troupe {tr/plain[0]:.2f}x, PyTorch {pt/plain[1]:.2f}x" if cn else ""
                print(f"{label}: batch {B}, {res}px, {a.threads} threads: troupe {tr*1000:.1f} ms/step, "
                      f"PyTorch {pt*1000:.1f} ms/step, ratio {tr/pt:.2f}{extra}", flush=True)
                plain = (tr, pt)


if __name__ == "__main__":
    main()
