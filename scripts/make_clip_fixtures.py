#!/usr/bin/env python3
"""transformers CLIP parity fixtures (tiny random weights) for troupe-models.

Writes crates/troupe-models/tests/fixtures/clip/<name>/ (config.json + model.safetensors via
save_pretrained) and io.safetensors with inputs and float32 outputs:

* text_quick:   CLIPTextModel, quick_gelu, 3 layers, 4 heads, eos_token_id 2 (legacy argmax pooling)
* text_proj:    CLIPTextModelWithProjection, gelu, 2 layers, eos_token_id 999 (first-eos pooling)
* text_proj_f16: text_proj saved in float16 (reference outputs: f16-rounded weights in f32)
* vision:       CLIPVisionModelWithProjection, gelu, 32 px, 8 px patches (17 tokens), 2 layers

Text io: `input_ids` (int64) → `last_hidden_state`, `penultimate_hidden_state`, `pooled` and
`text_embeds` (projection models). Vision io: `pixel_values` → `penultimate_hidden_state`,
`image_embeds`. Names match `troupe debug forward`.

Run: ~/.cache/troupe-pyref/bin/python scripts/make_clip_fixtures.py
"""
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)

OUT = os.path.join(os.path.dirname(__file__), "..", "crates/troupe-models/tests/fixtures/clip")


def randomise(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm1.weight") or "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def save(model, name):
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg.pop("transformers_version", None)
    json.dump(cfg, open(path, "w"), indent=2, sort_keys=True)
    return d


def text_ids(vocab, eos, gen):
    ids = torch.randint(3, vocab - 2, (3, 77), generator=gen)
    ids[:, 0] = vocab - 2  # bos
    for row, end in enumerate([5, 76, 40]):
        ids[row, end] = eos
        ids[row, end + 1:] = eos if row != 2 else 1  # pad with eos, or with a pad id
    return ids


def text_io(model, ids, proj):
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    io = {"input_ids": ids, "last_hidden_state": out.last_hidden_state, "penultimate_hidden_state": out.hidden_states[-2]}
    if proj:
        io["text_embeds"] = out.text_embeds
        # pooled = last_hidden_state at the eos position (the projection model does not return it)
        io["pooled"] = model.text_model(ids).pooler_output
    else:
        io["pooled"] = out.pooler_output
    return {k: v.contiguous() for k, v in io.items()}


def main():
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(3)
    base = dict(vocab_size=1000, max_position_embeddings=77, intermediate_size=37, hidden_size=32,
                bos_token_id=998, pad_token_id=1)

    m = CLIPTextModel(CLIPTextConfig(num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu",
                                     eos_token_id=2, **base)).eval()
    randomise(m, gen)
    d = save(m, "text_quick")
    ids = text_ids(1000, 999, gen)  # legacy rule: argmax of ids = the eos (999), the largest id
    save_file(text_io(m, ids, False), os.path.join(d, "io.safetensors"))

    m = CLIPTextModelWithProjection(CLIPTextConfig(num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu",
                                                   eos_token_id=999, projection_dim=24, **base)).eval()
    randomise(m, gen)
    d = save(m, "text_proj")
    ids = text_ids(1000, 999, gen)
    save_file(text_io(m, ids, True), os.path.join(d, "io.safetensors"))
    d16 = save(m.half(), "text_proj_f16")
    m = m.float()
    save_file(text_io(m, ids, True), os.path.join(d16, "io.safetensors"))

    m = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=24,
                                                       num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                                       patch_size=8, hidden_act="gelu")).eval()
    randomise(m, gen)
    d = save(m, "vision")
    px = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        out = m(px, output_hidden_states=True)
    save_file({"pixel_values": px, "penultimate_hidden_state": out.hidden_states[-2].contiguous(),
               "image_embeds": out.image_embeds.contiguous()}, os.path.join(d, "io.safetensors"))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
