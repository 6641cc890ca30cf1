#!/usr/bin/env python3
"""Reference values of StoryMaker's losses (storymaker.md §5.2) for troupe-train's test.

Computed per image as the reference does (batch 1), then averaged over the batch. Writes
crates/troupe-train/tests/fixtures/objective.safetensors.

Run: ~/.cache/troupe-pyref/bin/python scripts/make_objective_fixtures.py
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

torch.manual_seed(0)
B, C, H, W, T = 2, 2, 8, 8, 3  # batch, character slots, latent size, tokens per slot
chars = [2, 1]
pred, target = torch.randn(B, 4, H, W), torch.randn(B, 4, H, W)
masks = torch.rand(B, C, H, W)
masks[1, 1] = 0.0  # sample 1 has one character: its second slot is padding
keep = torch.tensor([1.0, 0.0])
layers = [torch.softmax(torch.randn(B, (1 + C) * T, (H // 2) * (W // 2)), dim=1) for _ in range(2)]
# sample 1 only has (1 + 1) slots of tokens; its padded slot's probabilities are zero
for l in layers:
    l[1, (1 + chars[1]) * T:] = 0.0
    l[1] = l[1] / l[1].sum(0, keepdim=True)


def noise_loss_one(p, t, m, kept, w=5.0):
    e = (p - t) ** 2
    if kept:
        e = e + w * e * m.sum(0, keepdim=True).clamp(0, 1)
    return e.mean()


def attn_loss_one(probs, m, n):
    h, w = H // 2, W // 2
    mm = F.interpolate(m[None], size=(2 * h, 2 * w), mode="bilinear")[0]
    acc = None
    for p in probs:
        a = F.interpolate(p.reshape(1, -1, h, w), size=(2 * h, 2 * w), mode="bilinear")[0]
        slots = torch.stack([a[s * T:(s + 1) * T].sum(0) for s in range(1 + n)])
        acc = slots if acc is None else acc + slots
    acc = acc / len(probs)
    loss = sum(((acc[1 + i] - mm[i]) ** 2).mean() for i in range(n))
    loss = loss + ((acc[0] - (1 - mm[:n].sum(0).clamp(0, 1))) ** 2).mean()
    return loss / n


noise = torch.stack([noise_loss_one(pred[b], target[b], masks[b, :chars[b]], keep[b] > 0) for b in range(B)]).mean()
attn = torch.stack([attn_loss_one([l[b] for l in layers], masks[b], chars[b]) for b in range(B)]).mean()
out = os.path.join(os.path.dirname(__file__), "..", "crates/troupe-train/tests/fixtures/objective.safetensors")
save_file({"pred": pred, "target": target, "masks": masks, "keep": keep, "layer0": layers[0].contiguous(),
           "layer1": layers[1].contiguous(), "noise_loss": noise.reshape(1), "attn_loss": attn.reshape(1)}, out)
print("noise", noise.item(), "attn", attn.item())
