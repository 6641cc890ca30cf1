#!/usr/bin/env python3
"""torch.optim.AdamW reference trajectory for troupe-train's optimizer test.

Writes crates/troupe-train/tests/fixtures/adamw.json: initial parameter (3x4), per-step
gradients and learning rates, and the parameter after each step, for AdamW(betas=(0.9, 0.999),
eps=1e-8, weight_decay=0.01) with a changing learning rate.

Run: ~/.cache/troupe-pyref/bin/python scripts/make_optim_fixtures.py
"""
import json
import os

import torch

torch.manual_seed(0)
p = torch.nn.Parameter(torch.randn(3, 4))
opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
out = {"init": p.detach().flatten().tolist(), "steps": []}
for i, lr in enumerate([1e-2, 5e-3, 5e-3, 1e-3]):
    for g in opt.param_groups:
        g["lr"] = lr
    grad = torch.randn(3, 4) * (10.0 ** (i - 2))
    p.grad = grad.clone()
    opt.step()
    out["steps"].append({"lr": lr, "grad": grad.flatten().tolist(), "param": p.detach().flatten().tolist()})
path = os.path.join(os.path.dirname(__file__), "..", "crates/troupe-train/tests/fixtures/adamw.json")
json.dump(out, open(path, "w"))
print("wrote", path)
