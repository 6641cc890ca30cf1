#!/usr/bin/env python3
"""Generate diffusers UNet2DConditionModel parity fixtures (tiny random weights) for troupe-models.

Writes to crates/troupe-models/tests/fixtures/unet/:

* sdxl_tiny/      SDXL layout in miniature: DownBlock2D + 2 CrossAttnDownBlock2D, linear projections,
                  per-block heads (1, 2, 2) and transformer layers (1, 1, 2), text_time embedding.
* sd15_tiny/      SD 1.x layout: conv projections, one head count for every block, no add embedding.
* sd15_tiny_f16/  the same weights saved as float16 (outputs computed with those f16-rounded
                  weights upcast to f32, which is what troupe does when it loads them as f32).
* sdxl_tiny_adapter.safetensors  StoryMaker processors (`ip_adapter.{i}.*`, rank 4) for sdxl_tiny,
                  random (LoRA `up` included, so every delta is non-zero).

Each folder holds config.json + diffusion_pytorch_model.safetensors (save_pretrained) and
io_<case>.safetensors with the inputs named as `troupe debug forward --component unet` reads
them (`sample`, `timestep`, `encoder_hidden_states`, `text_embeds`, `time_ids`) and the output
`out`; the adapter case also stores `attn_probs.{i}` (B, N_ip, HW) for every cross-attention.

The StoryMaker processors are re-implemented here from shared/reference/storymaker.md §2
(LoRAAttnProcessor2_0 / LoRAIPAttnProcessor2_0 with the hard-coded 77-token split and the
`ip_loss > 0` attention-probability path).

Run: ~/.cache/troupe-pyref/bin/python scripts/make_unet_fixtures.py
"""

import json
import math
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates/troupe-models/tests/fixtures/unet")
TEXT_TOKENS = 77  # StoryMaker's end_pos

SDXL_TINY = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(1, 2, 2),  # diffusers' naming quirk: these are head *counts*
    use_linear_projection=True,
    cross_attention_dim=16,
    addition_embed_type="text_time",
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=12 + 6 * 4,
    norm_num_groups=4,
)

SD15_TINY = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    attention_head_dim=2,
    use_linear_projection=False,
    cross_attention_dim=12,
    norm_num_groups=4,
)


def randomise(model, gen):
    """Non-trivial values everywhere (norm scales/shifts and biases too), so tests can fail."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


class LoRALinearLayer(nn.Module):
    def __init__(self, d_in, d_out, rank):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)

    def forward(self, x):
        return self.up(self.down(x))


def heads_split(attn, x):
    b, n, _ = x.shape
    return x.view(b, n, attn.heads, -1).transpose(1, 2)


def heads_merge(x):
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class LoRAAttnProcessor(nn.Module):
    """storymaker.md §2.1 (self-attention)."""

    def __init__(self, hidden, cross, rank, lora_scale):
        super().__init__()
        kv = cross or hidden
        self.lora_scale = lora_scale
        self.to_q_lora = LoRALinearLayer(hidden, hidden, rank)
        self.to_k_lora = LoRALinearLayer(kv, hidden, rank)
        self.to_v_lora = LoRALinearLayer(kv, hidden, rank)
        self.to_out_lora = LoRALinearLayer(hidden, hidden, rank)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        s = self.lora_scale
        h = hidden_states
        ehs = h if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(h) + s * self.to_q_lora(h)
        k = attn.to_k(ehs) + s * self.to_k_lora(ehs)
        v = attn.to_v(ehs) + s * self.to_v_lora(ehs)
        a = F.scaled_dot_product_attention(heads_split(attn, q), heads_split(attn, k), heads_split(attn, v))
        a = heads_merge(a)
        return attn.to_out[0](a) + s * self.to_out_lora(a)


class LoRAIPAttnProcessor(nn.Module):
    """storymaker.md §2.2-2.3 (decoupled cross-attention, attention maps recorded)."""

    def __init__(self, hidden, cross, rank, lora_scale, scale):
        super().__init__()
        self.lora_scale = lora_scale
        self.scale = scale
        self.to_q_lora = LoRALinearLayer(hidden, hidden, rank)
        self.to_k_lora = LoRALinearLayer(cross, hidden, rank)
        self.to_v_lora = LoRALinearLayer(cross, hidden, rank)
        self.to_out_lora = LoRALinearLayer(hidden, hidden, rank)
        self.to_k_ip = nn.Linear(cross, hidden, bias=False)
        self.to_v_ip = nn.Linear(cross, hidden, bias=False)
        self.attn_probs = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        s = self.lora_scale
        h = hidden_states
        q = attn.to_q(h) + s * self.to_q_lora(h)
        text, ip = encoder_hidden_states[:, :TEXT_TOKENS], encoder_hidden_states[:, TEXT_TOKENS:]
        k = attn.to_k(text) + s * self.to_k_lora(text)
        v = attn.to_v(text) + s * self.to_v_lora(text)
        qh = heads_split(attn, q)
        a = F.scaled_dot_product_attention(qh, heads_split(attn, k), heads_split(attn, v))
        # ip_loss > 0 path: explicit probabilities (B, heads, HW, N_ip), kept head-averaged.
        kip = heads_split(attn, self.to_k_ip(ip))
        vip = heads_split(attn, self.to_v_ip(ip))
        probs = torch.softmax((qh @ kip.transpose(-1, -2)) * attn.scale, dim=-1)
        self.attn_probs = probs.mean(1).permute(0, 2, 1).float()  # (B, N_ip, HW)
        a = a + self.scale * (probs @ vip)
        a = heads_merge(a)
        return attn.to_out[0](a) + s * self.to_out_lora(a)


def processor_hidden_size(config, name):
    """The hidden size the reference's `set_ip_adapter` gives processor `name`."""
    if name.startswith("mid_block"):
        return config.block_out_channels[-1]
    if name.startswith("up_blocks"):
        return list(reversed(config.block_out_channels))[int(name[len("up_blocks.")])]
    return config.block_out_channels[int(name[len("down_blocks.")])]


def attach_processors(unet, rank, lora_scale, scale, gen):
    procs = {}
    modules = []
    for name in unet.attn_processors.keys():
        hidden = processor_hidden_size(unet.config, name)
        if name.endswith("attn1.processor"):
            p = LoRAAttnProcessor(hidden, None, rank, lora_scale)
        else:
            p = LoRAIPAttnProcessor(hidden, unet.config.cross_attention_dim, rank, lora_scale, scale)
        procs[name] = p
        modules.append(p)
    unet.set_attn_processor(procs)
    adapter = nn.ModuleList(modules)
    randomise(adapter, gen)
    return adapter


def unet_inputs(config, b, h, w, seq, gen):
    io = {
        "sample": torch.randn(b, config["in_channels"], h, w, generator=gen),
        "timestep": torch.tensor([999.0, 17.5, 500.0][:b]),
        "encoder_hidden_states": torch.randn(b, seq, config["cross_attention_dim"], generator=gen),
    }
    if config.get("addition_embed_type") == "text_time":
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        io["text_embeds"] = torch.randn(b, text_dim, generator=gen)
        io["time_ids"] = torch.tensor([[1024.0, 768.0, 0.0, 0.0, 1286.0, 960.0]] * b)
    return io


def run(unet, io):
    with torch.no_grad():
        added = None
        if "text_embeds" in io:
            added = {"text_embeds": io["text_embeds"], "time_ids": io["time_ids"]}
        return unet(io["sample"], io["timestep"], io["encoder_hidden_states"], added_cond_kwargs=added).sample


def save_model(unet, name):
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    unet.save_pretrained(d, safe_serialization=True)
    # Keep the committed config minimal and stable: drop diffusers' bookkeeping keys.
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg.pop("_diffusers_version", None)
    json.dump(cfg, open(path, "w"), indent=2, sort_keys=True)
    return d


def save_io(d, case, io, out, extra=None):
    tensors = {k: v.contiguous() for k, v in io.items()}
    tensors["out"] = out.contiguous()
    tensors.update(extra or {})
    save_file(tensors, os.path.join(d, f"io_{case}.safetensors"))


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)

    # SDXL-like: plain forward on an even and an odd latent (odd sizes forward skip sizes to
    # the upsamplers), then with StoryMaker processors.
    gen = torch.Generator().manual_seed(1)
    unet = UNet2DConditionModel(**SDXL_TINY).eval()
    randomise(unet, gen)
    d = save_model(unet, "sdxl_tiny")
    for case, (b, h, w) in {"even": (2, 16, 16), "odd": (1, 14, 10)}.items():
        io = unet_inputs(SDXL_TINY, b, h, w, TEXT_TOKENS, gen)
        save_io(d, case, io, run(unet, io))

    adapter = attach_processors(unet, rank=4, lora_scale=0.8, scale=0.7, gen=gen)
    n_ip = 2 * 5  # bg + one character, 5 tokens each
    io = unet_inputs(SDXL_TINY, 2, 8, 8, TEXT_TOKENS + n_ip, gen)
    out = run(unet, io)
    probs = {}
    for i, p in enumerate(adapter):
        if isinstance(p, LoRAIPAttnProcessor):
            probs[f"attn_probs.{i}"] = p.attn_probs.contiguous()
    save_io(d, "adapter", io, out, probs)
    save_file(
        {f"ip_adapter.{k}": v.contiguous() for k, v in adapter.state_dict().items()},
        os.path.join(OUT, "sdxl_tiny_adapter.safetensors"),
    )

    # SD 1.x-like, f32 and f16 weights.
    gen = torch.Generator().manual_seed(2)
    unet = UNet2DConditionModel(**SD15_TINY).eval()
    randomise(unet, gen)
    d = save_model(unet, "sd15_tiny")
    io = unet_inputs(SD15_TINY, 2, 16, 16, 7, gen)
    save_io(d, "even", io, run(unet, io))

    d16 = save_model(unet.half(), "sd15_tiny_f16")
    unet = unet.float()  # f16-rounded weights, computed in f32
    save_io(d16, "even", io, run(unet, io))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
