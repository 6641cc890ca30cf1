#!/usr/bin/env python3
"""The full-size StoryMaker state dict's keys and shapes, from the reference's own modules.

Builds, on PyTorch's meta device (shapes only, no memory), what the reference's
`StableDiffusionXLStoryMakerPipeline` builds for SDXL: `faceid_plus(cross_attention_dim=2048,
id_embeddings_dim=512, clip_embeddings_dim=1280)` (`set_image_proj_model`) and, for every
attention processor of the SDXL UNet (config: crates/troupe-models/tests/fixtures/flops/
sdxl_config.json), `LoRAAttnProcessor2_0` / `LoRAIPAttnProcessor2_0` at rank 128 with the hidden
size `set_ip_adapter` computes; then the two state dicts `mask.bin` holds
(`image_proj_model` and `ModuleList(unet.attn_processors.values())`, train_storymaker.py).

Writes crates/troupe-models/tests/fixtures/export/storymaker_sdxl_keys.json:
{"image_proj_model": {key: shape}, "ip_adapter": {key: shape}}.

Run: ~/.cache/troupe-pyref/bin/python scripts/make_export_key_table.py --storymaker DIR
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from make_pipeline_fixtures import import_reference  # noqa: E402
from make_unet_fixtures import processor_hidden_size  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storymaker", required=True)
    a = ap.parse_args()
    psm, _, _ = import_reference(a.storymaker)
    from diffusers import UNet2DConditionModel

    config = json.load(open(os.path.join(ROOT, "crates/troupe-models/tests/fixtures/flops/sdxl_config.json")))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        proj = psm.faceid_plus(cross_attention_dim=unet.config.cross_attention_dim, id_embeddings_dim=512,
                               clip_embeddings_dim=1280)
        procs = {}
        for name in unet.attn_processors.keys():  # set_ip_adapter's loop
            cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
            hidden = processor_hidden_size(unet.config, name)
            cls = psm.LoRAAttnProcessor if cross is None else psm.LoRAIPAttnProcessor
            procs[name] = cls(hidden_size=hidden, cross_attention_dim=cross, rank=128)
        unet.set_attn_processor(procs)
        layers = torch.nn.ModuleList(unet.attn_processors.values())
    table = {
        "image_proj_model": {k: list(v.shape) for k, v in proj.state_dict().items()},
        "ip_adapter": {k: list(v.shape) for k, v in layers.state_dict().items()},
    }
    out = os.path.join(ROOT, "crates/troupe-models/tests/fixtures/export/storymaker_sdxl_keys.json")
    with open(out, "w") as f:
        json.dump(table, f, indent=0, sort_keys=True)
        f.write("\n")
    print("wrote", out, {g: len(v) for g, v in table.items()})


if __name__ == "__main__":
    main()
