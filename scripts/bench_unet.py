#!/usr/bin/env python3
"""UNet forward time: troupe (burn, flex CPU backend) vs diffusers, same config, same inputs
shapes, same thread count, measured in one run. Prints one line per config and the ratio
troupe / diffusers (below 1.0 = troupe faster).

Configs: `tiny` = the sdxl_tiny parity fixture; `mid` = an SDXL-layout UNet at 1/5 of SDXL's
widths (64/128/256 channels, head dim 64, transformer layers 1/2/2, ~30M parameters).

With `--memory`: saves an SDXL-width UNet (320/640/1280 channels, transformer layers 1/2/2,
~0.9B parameters) in f32 and in f16, loads each with troupe and prints peak resident memory
against the size of the weight file (the target: one copy of the weights, f16 kept f16).

Run (after `cargo build --release -p troupe-cli`):
    ~/.cache/troupe-pyref/bin/python scripts/bench_unet.py [--threads 2] [--troupe PATH] [--memory]
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch
from diffusers import UNet2DConditionModel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MID = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(64, 128, 256),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(1, 2, 4),
    use_linear_projection=True,
    cross_attention_dim=256,
    addition_embed_type="text_time",
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=128 + 6 * 32,
    norm_num_groups=32,
)

MEMORY = dict(MID, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
              cross_attention_dim=2048, addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=1280 + 6 * 256)

CASES = {
    # name: (config source, batch, latent h, latent w)
    "tiny": ("fixture", 2, 16, 16),
    "mid": (MID, 1, 32, 32),
}


def diffusers_time(unet, cfg, b, h, w, iters, warmup):
    cross = cfg["cross_attention_dim"]
    args = (
        torch.randn(b, cfg["in_channels"], h, w),
        torch.full((b,), 500.0),
        torch.randn(b, 77, cross),
    )
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        text = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(b, text), "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * b)}
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            t = time.perf_counter()
            unet(*args, added_cond_kwargs=added)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--troupe", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "troupe"))
    ap.add_argument("--memory", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    if args.memory:
        return memory(args, env)

    with tempfile.TemporaryDirectory() as tmp:
        for name, (source, b, h, w) in CASES.items():
            if source == "fixture":
                path = os.path.join(ROOT, "crates/troupe-models/tests/fixtures/unet/sdxl_tiny/config.json")
                cfg = json.load(open(path))
                unet = UNet2DConditionModel.from_config(cfg).eval()
            else:
                cfg = source
                unet = UNet2DConditionModel(**cfg).eval()
                path = os.path.join(tmp, f"{name}.json")
                unet.save_config(tmp)
                os.replace(os.path.join(tmp, "config.json"), path)
            params = sum(p.numel() for p in unet.parameters())
            torch_s = diffusers_time(unet, cfg, b, h, w, args.iters, args.warmup)
            out = subprocess.run(
                [args.troupe, "debug", "bench-unet", "--config", path, "--batch", str(b), "--height", str(h),
                 "--width", str(w), "--iters", str(args.iters), "--warmup", str(args.warmup), "--json"],
                env=env, check=True, capture_output=True, text=True,
            )
            troupe_s = json.loads(out.stdout)["median_s"]
            print(f"{name}: {params/1e6:.1f}M params, batch {b}, latent {h}x{w}, {args.threads} threads: "
                  f"troupe {troupe_s*1000:.1f} ms, diffusers {torch_s*1000:.1f} ms, ratio {troupe_s/torch_s:.2f}")


def memory(args, env):
    unet = UNet2DConditionModel(**MEMORY)
    params = sum(p.numel() for p in unet.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, keep in [(torch.float32, False), (torch.float16, True)]:
            d = os.path.join(tmp, str(dtype))
            unet.to(dtype).save_pretrained(d, safe_serialization=True)
            size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
            cmd = [args.troupe, "debug", "bench-unet", "--model", d, "--height", "8", "--width", "8",
                   "--iters", "1", "--warmup", "0", "--json"] + (["--keep-dtype"] if keep else [])
            out = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            load = out["load"]
            print(f"{params/1e6:.0f}M params, {dtype}: file {size/2**20:.0f} MiB, troupe peak RSS after load "
                  f"{load['peak_rss_mb']:.0f} MB (before {load['rss_before_mb']:.0f} MB), "
                  f"peak/file {load['peak_rss_mb'] * 2**20 / size:.2f}, "
                  f"load {load['load_s']:.1f} s")


if __name__ == "__main__":
    main()
