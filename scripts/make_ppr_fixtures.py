#!/usr/bin/env python3
"""Generate PyTorch parity fixtures for the StoryMaker PPR (`faceid_plus`) burn port.

A PyTorch re-implementation of `faceid_plus` written from the reference description
(shared/reference/storymaker.md §1), instantiated with TINY sizes and seeded random weights
(the zero-initialised `pos_embed`, `bg_embed` and `proj_out` get random non-zero values so the
test exercises them). Writes to crates/troupe-models/tests/fixtures/ppr/:

* weights.safetensors  - state dict with the exact key names of storymaker.md §3.3
* io.safetensors       - inputs and outputs for B = 1 and B = 3 (forward without dropout),
                         plus B = 2 with the face group dropped (drop_face=True, drop_clip=False)

Run with the pinned env: ~/.cache/troupe-pyref/bin/python scripts/make_ppr_fixtures.py
"""

import math
import os

import torch
import torch.nn as nn
from safetensors.torch import save_file

# Tiny sizes; must match `tiny_config()` in crates/troupe-models/tests/ppr.rs.
CROSS_DIM = 32  # cross_attention_dim (2048 in SDXL)
ID_DIM = 16  # id_embeddings_dim (512)
CLIP_DIM = 24  # clip_embeddings_dim (1280); also the width of `resample`
NUM_TOKENS = 4
DEPTH = 2
DIM_HEAD = 8
NUM_QUERIES = 16
FF_MULT = 2
MAX_CHARS = 3
CLIP_SEQ = 9  # 257 in SDXL (CLS + 16x16 patches)


def FeedForward(dim, mult=4):
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


def reshape_tensor(x, heads):
    bs, length, _ = x.shape
    x = x.view(bs, length, heads, -1).transpose(1, 2)
    return x.reshape(bs, heads, length, -1)


class PerceiverAttention(nn.Module):
    def __init__(self, *, dim, dim_head=64, heads=8):
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, l, _ = latents.shape
        q = self.to_q(latents)
        kv_input = torch.cat((x, latents), dim=-2)
        k, v = self.to_kv(kv_input).chunk(2, dim=-1)
        q = reshape_tensor(q, self.heads)
        k = reshape_tensor(k, self.heads)
        v = reshape_tensor(v, self.heads)
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = weight @ v
        out = out.permute(0, 2, 1, 3).reshape(b, l, -1)
        return self.to_out(out)


class Resampler(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), FeedForward(dim, ff_mult)]
                )
                for _ in range(depth)
            ]
        )

    def forward(self, x):
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FacePerceiverResampler(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, embedding_dim, output_dim, ff_mult):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), FeedForward(dim, ff_mult)]
                )
                for _ in range(depth)
            ]
        )

    def forward(self, latents, x):
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FaceIdPlus(nn.Module):
    def __init__(self):
        super().__init__()
        tokens = NUM_TOKENS + NUM_QUERIES
        self.num_tokens = NUM_TOKENS
        self.cross_attention_dim = CROSS_DIM
        self.proj = nn.Sequential(
            nn.Linear(ID_DIM, ID_DIM * 2), nn.GELU(), nn.Linear(ID_DIM * 2, CROSS_DIM * NUM_TOKENS)
        )
        self.norm = nn.LayerNorm(CROSS_DIM)
        self.perceiver_resampler = FacePerceiverResampler(
            CROSS_DIM, DEPTH, DIM_HEAD, CROSS_DIM // DIM_HEAD, CLIP_DIM, CROSS_DIM, FF_MULT
        )
        self.resample = Resampler(
            CLIP_DIM, DEPTH, DIM_HEAD, CLIP_DIM // DIM_HEAD, NUM_QUERIES, CLIP_DIM, CROSS_DIM, FF_MULT
        )
        self.pos_embed = nn.Parameter(torch.zeros(MAX_CHARS, tokens, CROSS_DIM))
        self.bg_embed = nn.Parameter(torch.zeros(1, tokens, CROSS_DIM))
        self.proj_out = nn.Linear(CROSS_DIM, CROSS_DIM)
        self.norm_out = nn.LayerNorm(CROSS_DIM)

    def forward(self, id_embeds, clip_embeds, face_embeds, drop_face=False, drop_clip=False):
        x = self.proj(id_embeds)
        x = x.reshape(-1, self.num_tokens, self.cross_attention_dim)
        x = self.norm(x)
        out = self.perceiver_resampler(x, face_embeds)
        out = x + out
        clip = self.resample(clip_embeds)
        if drop_face:
            out = out * 0
        if drop_clip:
            clip = clip * 0
        cat = torch.cat([out, clip], dim=1) + self.pos_embed[: out.shape[0]]
        res = self.norm_out(self.proj_out(cat)) + cat
        # Quirk: self.bg_embed is always concatenated first along the batch axis.
        return torch.cat([self.bg_embed, res], dim=0)


def main():
    torch.manual_seed(1234)
    model = FaceIdPlus().eval()
    with torch.no_grad():
        # Make every parameter non-trivial (LayerNorm affine, zero-init params included).
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
        model.pos_embed.copy_(0.5 * torch.randn_like(model.pos_embed))
        model.bg_embed.copy_(0.5 * torch.randn_like(model.bg_embed))
        model.proj_out.weight.copy_(torch.randn_like(model.proj_out.weight) / math.sqrt(CROSS_DIM))
        model.proj_out.bias.copy_(0.1 * torch.randn_like(model.proj_out.bias))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    io = {}
    with torch.no_grad():
        for b, drop_face, drop_clip, tag in [(1, False, False, "b1"), (3, False, False, "b3"), (2, True, False, "b2_dropface")]:
            idv = torch.nn.functional.normalize(torch.randn(b, ID_DIM), dim=-1)
            clip = torch.randn(b, CLIP_SEQ, CLIP_DIM)
            face = torch.randn(b, CLIP_SEQ, CLIP_DIM)
            out = model(idv, clip, face, drop_face=drop_face, drop_clip=drop_clip)
            assert out.shape == (1 + b, NUM_TOKENS + NUM_QUERIES, CROSS_DIM), out.shape
            io[f"{tag}.id_embeds"] = idv.contiguous()
            io[f"{tag}.clip_embeds"] = clip.contiguous()
            io[f"{tag}.face_embeds"] = face.contiguous()
            io[f"{tag}.output"] = out.contiguous()

    out_dir = os.path.join(os.path.dirname(__file__), "..", "crates", "troupe-models", "tests", "fixtures", "ppr")
    os.makedirs(out_dir, exist_ok=True)
    # troupe reads the head width (not visible in shapes) from this metadata key.
    save_file(sd, os.path.join(out_dir, "weights.safetensors"), metadata={"troupe.ppr.resampler_dim_head": str(DIM_HEAD)})
    save_file(io, os.path.join(out_dir, "io.safetensors"))
    print(f"{len(sd)} weight tensors, {len(io)} io tensors -> {os.path.abspath(out_dir)}")


if __name__ == "__main__":
    main()
