#!/usr/bin/env python3
"""Build the tiny random-weight SDXL pipeline used by `configs/tiny.toml` (the README's main
command): every component in its diffusers/transformers layout, saved with save_pretrained, so
troupe loads it exactly as it loads a real SDXL folder.

configs/tiny-sdxl/
  model_index.json
  unet/            SDXL layout in miniature (3 levels, text_time embedding), cross-attention 32
  vae/             AutoencoderKL with the real ÷8 down-scale (4 blocks), 4 latent channels
  text_encoder/    CLIPTextModel, hidden 16 (penultimate states: 16)
  text_encoder_2/  CLIPTextModelWithProjection, hidden 16, projection 16 (16 + 16 = 32 = UNet cross)
  tokenizer/ tokenizer_2/   the real CLIP BPE vocabulary (from open_clip), SDXL's two configs
  scheduler/       SDXL's DDPMScheduler config
  image_encoder/   CLIPVisionModelWithProjection, 32 px input, 8 px patches, hidden 24
  controlnet/      ControlNetModel.from_unet(unet/) (a pose ControlNet in miniature), its zero
                   convolutions given small random weights so the residuals are not zero;
                   not in model_index.json (training and sampling name it by path)

Weights are stored as float16 to keep the repository small; troupe upcasts them.

Run: ~/.cache/troupe-pyref/bin/python scripts/make_tiny_models.py [--controlnet-only]
(`--controlnet-only` rebuilds controlnet/ from the committed unet/ and leaves the rest as is.)
"""
import json
import os
import shutil
import sys

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "configs", "tiny-sdxl")
sys.path.insert(0, HERE)
from make_tokenizer_fixtures import build_vocab_and_merges, configs, write_json  # noqa: E402


def tidy_config(d, name="config.json"):
    path = os.path.join(d, name)
    cfg = json.load(open(path))
    for k in ["_diffusers_version", "transformers_version", "_name_or_path"]:
        cfg.pop(k, None)
    json.dump(cfg, open(path, "w"), indent=2, sort_keys=True)


def save(model, sub):
    d = os.path.join(OUT, sub)
    model.half().save_pretrained(d, safe_serialization=True)
    tidy_config(d)


def make_controlnet(unet):
    """A pose ControlNet for the tiny UNet, as diffusers' ControlNet training starts one."""
    gen = torch.Generator().manual_seed(7)
    cn = ControlNetModel.from_unet(unet.float(), conditioning_embedding_out_channels=(8, 8, 16, 16))
    with torch.no_grad():
        zero = [cn.controlnet_cond_embedding.conv_out, cn.controlnet_mid_block, *cn.controlnet_down_blocks]
        for conv in zero:
            for p in conv.parameters():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    save(cn, "controlnet")


def main():
    if "--controlnet-only" in sys.argv:
        make_controlnet(UNet2DConditionModel.from_pretrained(os.path.join(OUT, "unet")))
        print(f"wrote {os.path.join(OUT, 'controlnet')}")
        return
    torch.manual_seed(0)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32), layers_per_block=1, transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(1, 2, 2), use_linear_projection=True, cross_attention_dim=32,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8,
    )
    save(unet, "unet")

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.13025,
    )
    save(vae, "vae")

    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=1, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    save(CLIPTextModel(CLIPTextConfig(hidden_size=16, hidden_act="quick_gelu", **common)), "text_encoder")
    save(CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=16, hidden_act="gelu", **common)),
         "text_encoder_2")
    save(CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, projection_dim=16, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, hidden_act="gelu")), "image_encoder")

    vocab, merges = build_vocab_and_merges()
    for sub, pad in [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")]:
        d = os.path.join(OUT, sub)
        os.makedirs(d)
        write_json(os.path.join(d, "vocab.json"), vocab)
        with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        cfg, stm = configs(pad)
        write_json(os.path.join(d, "tokenizer_config.json"), cfg)
        write_json(os.path.join(d, "special_tokens_map.json"), stm)

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")
    sched.save_pretrained(os.path.join(OUT, "scheduler"))
    tidy_config(os.path.join(OUT, "scheduler"), "scheduler_config.json")

    write_json(os.path.join(OUT, "model_index.json"), {
        "_class_name": "StableDiffusionXLPipeline",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    # Last, so the global random stream of the components above is unchanged.
    make_controlnet(UNet2DConditionModel.from_pretrained(os.path.join(OUT, "unet")))
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
