#!/usr/bin/env python3
"""One StoryMaker adapter training step in PyTorch, timed: the same step as
`troupe debug bench-train` (PPR on random CLIP features and identity embeddings, the diffusers
UNet with the reference LoRA / decoupled image-attention processors (attention maps recorded),
region-weighted noise MSE + attention-map loss, backward, AdamW) on random weights of a UNet
config, as the reference trains: frozen UNet weights in bf16, trainable PPR and processors in
f32 under `torch.autocast(bf16)`, SDPA for the text attention (the image attention computes its
probabilities explicitly for the loss, as the reference's `ip_loss > 0` branch does).

Processors: scripts/make_unet_fixtures.py (LoRAAttnProcessor, LoRAIPAttnProcessor); PPR:
scripts/make_ppr_fixtures.py (FaceIdPlus) at StoryMaker SDXL's sizes; loss:
scripts/bench_train.py `storymaker_loss`. Step FLOPs: 2 × the UNet forward pass counted by
`torch.utils.flop_counter.FlopCounterMode` (troupe's count is the same; its tests check it
against this counter).

Prints one JSON line per batch size: ms/step (median), samples/s, peak memory (CUDA:
`torch.cuda.max_memory_allocated`), TFLOP/s and MFU (with --peak-tflops).

Run (GPU machine): python3 scripts/bench_train_gpu.py --unet-config crates/troupe-models/tests/fixtures/flops/sdxl_config.json \
    --height 128 --width 128 --batch 1 2 [--device cuda] [--steps 3] [--peak-tflops 989]
(`--device cpu` runs the same step on the CPU in f32, to check the script.)
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_ppr_fixtures as P  # noqa: E402
import make_unet_fixtures as M  # noqa: E402
from bench_train import storymaker_loss  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

CLIP_DIM, CLIP_SEQ, N_CHARS, TEXT = 1280, 257, 1, 77


def build(config, rank, dim_head, device, dtype):
    unet = UNet2DConditionModel.from_config(config).to(device=device, dtype=dtype).eval()
    unet.requires_grad_(False)
    adapter = M.attach_processors(unet, rank, 1.0, 1.0, torch.Generator().manual_seed(0)).to(device)
    P.CROSS_DIM, P.ID_DIM, P.CLIP_DIM, P.CLIP_SEQ = config["cross_attention_dim"], 512, CLIP_DIM, CLIP_SEQ
    P.NUM_TOKENS, P.NUM_QUERIES, P.DEPTH, P.DIM_HEAD, P.FF_MULT, P.MAX_CHARS = 4, 16, 4, dim_head, 4, 3
    ppr = P.FaceIdPlus().to(device)
    return unet, adapter, ppr


def inputs(config, b, h, w, device):
    text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    r = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    return {
        "ids": r(b, N_CHARS, 512), "body": r(b * N_CHARS, CLIP_SEQ, CLIP_DIM),
        "face": r(b * N_CHARS, CLIP_SEQ, CLIP_DIM), "text": r(b, TEXT, config["cross_attention_dim"]),
        "sample": r(b, config["in_channels"], h, w), "noise": r(b, config["out_channels"], h, w),
        "masks": (torch.rand(b, 3, h, w, device=device) > 0.5).float(),
        "added": {"text_embeds": r(b, text_dim),
                  "time_ids": torch.tensor([[1024.0, 1024.0, 0, 0, 1024.0, 1024.0]] * b, device=device)},
    }


def context(ppr, x):
    """Text states + each image's PPR tokens."""
    b, d = x["sample"].shape[0], x["text"].shape[-1]
    toks = [ppr(x["ids"][i], x["body"][i * N_CHARS:(i + 1) * N_CHARS], x["face"][i * N_CHARS:(i + 1) * N_CHARS])
            .reshape(1, -1, d) for i in range(b)]
    return torch.cat([x["text"], torch.cat(toks)], 1)


def unet_forward(unet, ehs, x):
    t = torch.full((x["sample"].shape[0],), 500.0, device=x["sample"].device)
    return unet(x["sample"], t, ehs, added_cond_kwargs=x["added"]).sample


def step(unet, ppr, recorded, x, device):
    # bf16 autocast on the GPU (the reference's mixed precision); f32 on the CPU check path.
    on_gpu = device.startswith("cuda")
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=on_gpu):
        ehs = context(ppr, x)
        pred = unet_forward(unet, ehs, x)
        return storymaker_loss(pred, x["noise"], x["masks"], recorded, N_CHARS), ehs.shape[1] - TEXT


def forward_flops(unet, ppr, x):
    """FLOPs of the UNet forward alone (troupe counts the same; the PPR is small beside it)."""
    with torch.no_grad():
        ehs = context(ppr, x)
        counter = FlopCounterMode(display=False)
        with counter:
            unet_forward(unet, ehs, x)
    return counter.get_total_flops()


def bench(config, b, args):
    dev = args.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    unet, adapter, ppr = build(config, args.lora_rank, args.ppr_dim_head, dev, dtype)
    # The attention loss reads the image-attention maps of the 1/4-resolution layers (1/32 of the image).
    down = len(config["block_out_channels"]) - 1
    recorded = [m for n, m in unet.attn_processors.items() if isinstance(m, M.LoRAIPAttnProcessor)
                and (n.startswith(f"down_blocks.{down}") or n.startswith("mid") or n.startswith("up_blocks.0"))]
    params = list(ppr.parameters()) + list(adapter.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    x = inputs(config, b, args.height, args.width, dev)
    flops = 2 * forward_flops(unet, ppr, x)
    for i in range(args.warmup + args.steps):
        x = inputs(config, b, args.height, args.width, dev)
        sync()
        t0 = time.perf_counter()
        loss, image_tokens = step(unet, ppr, recorded, x, dev)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())  # waits for the step
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    out = {"side": "pytorch", "device": dev, "batch": b, "latent": [args.height, args.width],
           "image_tokens": image_tokens, "median_s": median, "ms_per_step": 1000 * median,
           "samples_per_s": b / median, "step_flops": flops, "tflops": flops / median / 1e12,
           "losses": losses, "torch": torch.__version__}
    if dev.startswith("cuda"):
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        out["gpu"] = torch.cuda.get_device_name()
    if args.peak_tflops:
        out["mfu"] = out["tflops"] / args.peak_tflops
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--unet-config", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--lora-rank", type=int, default=128)
    ap.add_argument("--ppr-dim-head", type=int, default=64, help="PPR resampler head width (64; ≤ cross_attention_dim)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float)
    args = ap.parse_args()
    with open(args.unet_config) as f:
        config = json.load(f)
    torch.manual_seed(0)
    for b in args.batch:
        print(json.dumps(bench(config, b, args)), flush=True)


if __name__ == "__main__":
    main()
