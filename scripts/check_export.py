#!/usr/bin/env python3
"""Check troupe's adapter exports with PyTorch.

    check_export.py ADAPTER.safetensors MASK.bin [--unet-config unet/config.json]

* loads the `.bin` with `torch.load(weights_only=True)` (what the reference pipeline does) and the
  `.safetensors` with safetensors;
* checks the reference structure: `{'image_proj_model': ..., 'ip_adapter': ...}`, processor
  indices 0..N-1 with 8 tensors on even (self-attention) and 10 on odd (cross-attention) ones;
* compares every tensor of the two files (exactly when both have the same dtype);
* with --unet-config: builds the UNet with diffusers, attaches processors written from the
  reference (storymaker.md §2) for every `attn_processors` entry and loads `ip_adapter` with
  strict=True, as `pipeline_sdxl_storymaker.py` does.

Exit status 0 when every check passes.
"""
import argparse
import sys

import torch
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("safetensors")
    ap.add_argument("bin")
    ap.add_argument("--unet-config")
    a = ap.parse_args()
    st = load_file(a.safetensors)
    ckpt = torch.load(a.bin, weights_only=True, map_location="cpu")
    # The two reference groups, plus troupe's metadata strings (the adapter's architecture), which
    # the reference loader, taking the groups by name, ignores.
    assert set(ckpt) == {"image_proj_model", "ip_adapter", "troupe"}, set(ckpt)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in ckpt["troupe"].items())
    ipm, ipa = ckpt["image_proj_model"], ckpt["ip_adapter"]
    print(f"image_proj_model: {len(ipm)} tensors, ip_adapter: {len(ipa)} tensors")

    n = 1 + max(int(k.split(".")[0]) for k in ipa)
    for i in range(n):
        keys = [k for k in ipa if k.split(".")[0] == str(i)]
        want = 8 if i % 2 == 0 else 10
        assert len(keys) == want, f"processor {i}: {len(keys)} tensors, expected {want}"
        if i % 2 == 1:
            assert f"{i}.to_k_ip.weight" in ipa and f"{i}.to_v_ip.weight" in ipa, i
    print(f"{n} processors: even = 8 tensors (LoRA q/k/v/out), odd = 10 (+ to_k_ip, to_v_ip)")

    flat = {f"image_proj_model.{k}": v for k, v in ipm.items()}
    flat.update({f"ip_adapter.{k}": v for k, v in ipa.items()})
    assert set(flat) == set(st), (set(flat) ^ set(st))
    worst = 0.0
    for k, v in flat.items():
        s = st[k]
        assert v.shape == s.shape, (k, v.shape, s.shape)
        d = (v.float() - s.float()).abs().max().item() if v.numel() else 0.0
        if v.dtype == s.dtype:
            assert d == 0.0, (k, d)
        worst = max(worst, d)
    print(f"all {len(flat)} tensors agree between the two files (max abs diff {worst})")

    if a.unet_config:
        import json
        from diffusers import UNet2DConditionModel
        sys.path.insert(0, __file__.rsplit("/", 1)[0])
        from make_unet_fixtures import LoRAAttnProcessor, LoRAIPAttnProcessor

        cfg = json.load(open(a.unet_config))
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(cfg)
        rank = ipa["0.to_q_lora.down.weight"].shape[0]
        procs = []
        for name in unet.attn_processors.keys():
            if name.startswith("mid_block"):
                h = cfg["block_out_channels"][-1]
            elif name.startswith("up_blocks"):
                h = list(reversed(cfg["block_out_channels"]))[int(name[len("up_blocks.")])]
            else:
                h = cfg["block_out_channels"][int(name[len("down_blocks.")])]
            if name.endswith("attn1.processor"):
                procs.append(LoRAAttnProcessor(h, None, rank, 1.0))
            else:
                procs.append(LoRAIPAttnProcessor(h, cfg["cross_attention_dim"], rank, 1.0, 1.0))
        torch.nn.ModuleList(procs).load_state_dict(ipa, strict=True)
        print(f"ip_adapter loads with strict=True into the {len(procs)} reference processors of {a.unet_config}")
    print("OK")


if __name__ == "__main__":
    main()
