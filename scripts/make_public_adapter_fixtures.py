#!/usr/bin/env python3
"""The two public IP-Adapter checkpoints StoryMaker starts from, at tiny sizes, made with their
own code, and what StoryMaker's own training script loads from them.

* faceid_plusv2.{bin,safetensors}: IP-Adapter-FaceID-PlusV2-SDXL's layout — IP-Adapter's
  `ProjPlusModel` (here at depth 1, head width 8, identity width 64) and its `LoRAAttnProcessor` /
  `LoRAIPAttnProcessor` on every processor of the tiny SDXL UNet (rank 8).
* plus_vit_h.{bin,safetensors}: IP-Adapter-Plus-SDXL-ViT-H's layout — IP-Adapter's `Resampler`
  and `IPAttnProcessor` (16 tokens) / `AttnProcessor`.
  Tensors in float16, as published. `.bin`: `torch.save({"image_proj": …,
  "ip_adapter": ModuleList(processors).state_dict()})`;
  `.safetensors`: the same tensors as `image_proj.<k>` / `ip_adapter.<k>` (the layout
  IP-Adapter's own `load_ip_adapter` reads).
* expected.safetensors: StoryMaker's `train_storymaker.py` initialisation on these files —
  `faceid_plus.load_state_dict` (strict, fails) → `load_model(faceid["image_proj"],
  plus["image_proj"])`, then `adapter_modules.load_state_dict(faceid["ip_adapter"],
  strict=False)` on StoryMaker's processors — keeping exactly the tensors that came from the
  files, named as troupe names them (`image_proj_model.*`, `ip_adapter.*`).

Run: ~/.cache/troupe-pyref/bin/python scripts/make_public_adapter_fixtures.py \\
       --storymaker STORYMAKER_CHECKOUT --ip-adapter IP_ADAPTER_CHECKOUT
"""
import argparse
import math
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "crates/troupe-train/tests/fixtures/public_adapters")
sys.path.insert(0, HERE)
import make_pipeline_fixtures as mpf  # noqa: E402
from make_unet_fixtures import processor_hidden_size  # noqa: E402

RANK = 8
A = mpf.ADAPTER
A["id_embeddings_dim"] = 64  # small files (the real ones: 512, ArcFace's width)


def randomise(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(p.shape[-1], 1)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storymaker", required=True)
    ap.add_argument("--ip-adapter", required=True)
    a = ap.parse_args()
    psm, sm_faceid, sm_resampler = mpf.import_reference(a.storymaker)
    from ip_adapter import attention_processor_faceid as sm_procs  # StoryMaker's
    # IP-Adapter's own package, under another name (both repositories call it `ip_adapter`).
    link_dir = tempfile.mkdtemp()
    os.symlink(os.path.join(os.path.abspath(a.ip_adapter), "ip_adapter"), os.path.join(link_dir, "ipa_public"))
    sys.path.insert(0, link_dir)
    from ipa_public import attention_processor as ipa_attn
    from ipa_public import attention_processor_faceid as ipa_lora
    from ipa_public.ip_adapter_faceid import FacePerceiverResampler, ProjPlusModel
    from ipa_public.resampler import Resampler
    from diffusers import UNet2DConditionModel

    class TinyProjPlus(ProjPlusModel):
        """IP-Adapter's `ProjPlusModel` (FaceID-PlusV2) at depth 1, head width 8."""

        def __init__(self):
            torch.nn.Module.__init__(self)
            c, i = A["cross_attention_dim"], A["id_embeddings_dim"]
            self.cross_attention_dim, self.num_tokens = c, A["num_tokens"]
            self.proj = torch.nn.Sequential(torch.nn.Linear(i, i * 2), torch.nn.GELU(),
                                            torch.nn.Linear(i * 2, c * A["num_tokens"]))
            self.norm = torch.nn.LayerNorm(c)
            self.perceiver_resampler = FacePerceiverResampler(
                dim=c, depth=A["resampler_depth"], dim_head=A["resampler_dim_head"], heads=c // A["resampler_dim_head"],
                embedding_dim=A["clip_embeddings_dim"], output_dim=c, ff_mult=A["resampler_ff_mult"])

    unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, "configs/tiny-sdxl/unet"), torch_dtype=torch.float32)
    cross = unet.config.cross_attention_dim
    names = list(unet.attn_processors.keys())
    gen = torch.Generator().manual_seed(5)

    def processors(make):
        return torch.nn.ModuleList([make(n, processor_hidden_size(unet.config, n), n.endswith("attn1.processor"))
                                    for n in names])

    faceid_proj = TinyProjPlus()
    faceid_layers = processors(lambda n, h, self_attn: ipa_lora.LoRAAttnProcessor(h, None, rank=RANK) if self_attn
                               else ipa_lora.LoRAIPAttnProcessor(h, cross, rank=RANK, num_tokens=A["num_tokens"]))
    clip = A["clip_embeddings_dim"]
    plus_proj = Resampler(dim=clip, depth=A["resampler_depth"], dim_head=A["resampler_dim_head"],
                          heads=clip // A["resampler_dim_head"], num_queries=A["resampler_num_queries"],
                          embedding_dim=clip, output_dim=cross, ff_mult=A["resampler_ff_mult"])
    plus_layers = processors(lambda n, h, self_attn: ipa_attn.AttnProcessor() if self_attn
                             else ipa_attn.IPAttnProcessor(h, cross, num_tokens=A["resampler_num_queries"]))
    for m in (faceid_proj, faceid_layers, plus_proj, plus_layers):
        randomise(m, gen)

    os.makedirs(OUT, exist_ok=True)
    files = {}
    for name, proj, layers in [("faceid_plusv2", faceid_proj, faceid_layers), ("plus_vit_h", plus_proj, plus_layers)]:
        # float16, as the published files.
        sd = {"image_proj": {k: v.half() for k, v in proj.state_dict().items()},
              "ip_adapter": {k: v.half() for k, v in layers.state_dict().items()}}
        torch.save(sd, os.path.join(OUT, f"{name}.bin"))
        flat = {f"{g}.{k}": v.contiguous() for g, d in sd.items() for k, v in d.items()}
        save_file(flat, os.path.join(OUT, f"{name}.safetensors"))
        files[name] = sd

    # StoryMaker's initialisation (train_storymaker.py), on its own modules.
    psm.faceid_plus = mpf.make_tiny_faceid_plus(sm_faceid.faceid_plus, sm_faceid.FacePerceiverResampler, sm_resampler)
    sm_proj = psm.faceid_plus(cross_attention_dim=cross, id_embeddings_dim=A["id_embeddings_dim"],
                              clip_embeddings_dim=clip)
    try:
        sm_proj.load_state_dict(files["faceid_plusv2"]["image_proj"])
        raise AssertionError("StoryMaker's strict load should fail (pos_embed, bg_embed, … are new)")
    except RuntimeError:
        sm_proj.load_model(files["faceid_plusv2"]["image_proj"], files["plus_vit_h"]["image_proj"])
    sm_layers = processors(lambda n, h, self_attn: sm_procs.LoRAAttnProcessor2_0(h, None, rank=RANK) if self_attn
                           else sm_procs.LoRAIPAttnProcessor2_0(h, cross, rank=RANK, num_tokens=20))
    missing, unexpected = sm_layers.load_state_dict(files["faceid_plusv2"]["ip_adapter"], strict=False)
    taken_proj = set(files["faceid_plusv2"]["image_proj"]) | {f"resample.{k}" for k in files["plus_vit_h"]["image_proj"]}
    expected = {f"image_proj_model.{k}": v.float().contiguous() for k, v in sm_proj.state_dict().items() if k in taken_proj}
    expected.update({f"ip_adapter.{k}": v.float().contiguous() for k, v in sm_layers.state_dict().items() if k not in missing})
    save_file(expected, os.path.join(OUT, "expected.safetensors"))
    print("wrote", OUT, len(expected), "expected tensors;", len(missing), "processor keys not in the file;",
          len(unexpected), "unexpected")


if __name__ == "__main__":
    main()
