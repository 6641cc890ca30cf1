#!/usr/bin/env python3
"""Make the torch.save fixtures for crates/troupe-pt, or check a file it wrote.

    python scripts/make_pt_fixtures.py            # (re)write crates/troupe-pt/tests/fixtures/
    python scripts/make_pt_fixtures.py --check F  # torch.load(F, weights_only=True) == F.json

Needs the reference environment (`bash shared/tools/setup_pyref.sh`, torch and numpy);
the Rust tests only read the committed fixtures and never need Python.

Each fixture `<name>.bin` written with real torch comes with `<name>.json`: the
value torch.load returns, in an exact encoding shared with the Rust tests
(tests/common/mod.rs): null / true / false, {"int": n}, {"float": repr},
{"str": s}, {"bytes": hex}, {"tuple": [...]}, {"list": [...]},
{"dict": [[k, v], ...]}, {"odict": [[k, v], ...]} and
{"tensor": {"dtype": "float32", "shape": [...], "hex": little-endian C-order bytes}}.
numpy arrays are encoded as tensors, numpy scalars as Python numbers.
"""

import argparse
import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "troupe-pt", "tests", "fixtures")

NP_DTYPES = {
    "float64": "float64", "float32": "float32", "float16": "float16", "int64": "int64",
    "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
}


def enc(obj):
    """Exact JSON encoding of a loaded checkpoint value."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().clone()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"tensor": {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "hex": raw.hex()}}
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj).astype(obj.dtype.newbyteorder("<"))
        return {"tensor": {"dtype": NP_DTYPES[a.dtype.name], "shape": list(a.shape), "hex": a.tobytes().hex()}}
    if isinstance(obj, np.generic):
        return enc(obj.item())
    if isinstance(obj, int):
        return {"int": obj}
    if isinstance(obj, float):
        return {"float": repr(obj)}
    if isinstance(obj, str):
        return {"str": obj}
    if isinstance(obj, (bytes, bytearray)):
        return {"bytes": bytes(obj).hex()}
    if isinstance(obj, tuple):
        return {"tuple": [enc(x) for x in obj]}
    if isinstance(obj, list):
        return {"list": [enc(x) for x in obj]}
    if isinstance(obj, collections.OrderedDict):
        return {"odict": [[enc(k), enc(v)] for k, v in obj.items()]}
    if isinstance(obj, dict):
        return {"dict": [[enc(k), enc(v)] for k, v in obj.items()]}
    raise TypeError(f"cannot encode {type(obj)}")


def save(name, obj, **kw):
    path = os.path.join(OUT, name + ".bin")
    torch.save(obj, path, **kw)
    # The expected value is what torch itself loads back (weights_only=False so
    # numpy fixtures load too; these are our own trusted files).
    loaded = torch.load(path, weights_only=False)
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(enc(loaded), f, indent=1)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def hand_zip(name, pickle_bytes):
    """A torch-layout zip whose data.pkl is `pickle_bytes`; never loaded here."""
    path = os.path.join(OUT, name + ".bin")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", pickle_bytes)
        z.writestr(f"{name}/byteorder", b"little")
        z.writestr(f"{name}/version", b"3\n")
    print(f"wrote {path} (hand-built, not loadable on purpose)")


def faceid():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 512, generator=g)
    emb = emb / emb.norm(dim=1, keepdim=True)
    kps = torch.tensor([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]], dtype=torch.float32)
    save("faceid", {"id": emb, "kps": kps})
    # StoryMaker faceid files may hold numpy arrays instead of tensors.
    save("faceid_numpy", {"id": emb.numpy(), "kps": kps.double().numpy()})


def ip_adapter():
    torch.manual_seed(2)
    image_proj = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    layers = torch.nn.ModuleList([torch.nn.Linear(6, 4, bias=False) for _ in range(4)])
    ip = {f"{i // 2 * 2 + 1}.to_{'kv'[i % 2]}_ip.weight": l.weight for i, l in enumerate(layers)}
    ip = collections.OrderedDict((k, v.detach().half()) for k, v in ip.items())
    # state_dict() carries a `_metadata` attribute, pickled with BUILD.
    sd = image_proj.state_dict()
    assert hasattr(sd, "_metadata")
    save("ip_adapter", {"image_proj": sd, "ip_adapter": ip})
    # Same content with pickle protocol 4: SHORT_BINUNICODE, FRAME, MEMOIZE, STACK_GLOBAL.
    save("ip_adapter_proto4", {"image_proj": sd, "ip_adapter": ip}, pickle_protocol=4)


def views():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.5 - 1.0
    obj = {
        "base": base,
        "transposed": base.t(),
        "slice": base[1:, 1:3],
        "column": base[:, 2],
        "expanded": torch.tensor([1.0, 2.0, 3.0]).expand(2, 3),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 3),
        "half_view": base.half()[::2, ::3],
        "dtypes": {
            "float64": torch.tensor([1.5, -2.25, 1e300], dtype=torch.float64),
            "bfloat16": torch.tensor([1.0, -0.5, 3.140625], dtype=torch.bfloat16),
            "int64": torch.tensor([-(2**40), 7], dtype=torch.int64),
            "int32": torch.tensor([-5, 2**31 - 1], dtype=torch.int32),
            "int16": torch.tensor([-300, 300], dtype=torch.int16),
            "int8": torch.tensor([-128, 127], dtype=torch.int8),
            "uint8": torch.tensor([0, 255], dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
        },
        "python": {
            "none": None, "t": True, "f": False, "small": 5, "neg": -7, "big": 2**40, "huge_neg": -(2**62),
            "float": 0.1, "str": "héllo ✓", "bytes": b"\x00\xff\x10", "list": [1, [2, 3], "x"],
            "tuple": (1, 2.5, "three", None), "empty_tuple": (), 7: "int key", (1, 2): "tuple key",
        },
    }
    save("views", obj)
    # Big-endian variant: same records with byteorder "big" and byte-swapped
    # storages, which torch.load byte-swaps back.
    src = os.path.join(OUT, "views.bin")
    dst = os.path.join(OUT, "bigendian.bin")
    sizes = {}
    with zipfile.ZipFile(src) as zin:
        stem = zin.namelist()[0].split("/")[0]
        pkl = zin.read(f"{stem}/data.pkl")
        # Element size per storage key, from the persistent ids in the pickle.
        class P(pickle.Unpickler):
            def persistent_load(self, pid):
                sizes[pid[2]] = torch.tensor([], dtype=pid[1].dtype).element_size() if pid[1] is not torch.UntypedStorage else 1
                return pid

            def find_class(self, module, name):
                if module == "torch._utils":
                    return lambda *a: None
                return super().find_class(module, name)
        P(io.BytesIO(pkl)).load()
        with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                data = zin.read(info)
                rel = info.filename[len(stem) + 1:]
                if rel == "byteorder":
                    data = b"big"
                elif rel.startswith("data/"):
                    n = sizes[rel[5:]]
                    data = b"".join(data[i:i + n][::-1] for i in range(0, len(data), n))
                zout.writestr(f"bigendian/{rel}", data)
    loaded = torch.load(dst, weights_only=True)
    assert json.dumps(enc(loaded)) == json.dumps(enc(torch.load(src, weights_only=False)))
    print(f"wrote {dst} (torch.load verified it equals views.bin)")


def parameters():
    torch.manual_seed(3)
    lin = torch.nn.Linear(2, 3)
    save("parameter", {"w": torch.nn.Parameter(torch.randn(3, 2)), "linear": lin.state_dict(keep_vars=True)})


def numpy_extras():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    save("numpy_extras", {
        "fortran": np.asfortranarray(a),
        "big_endian": np.arange(4, dtype=">i4"),
        "bool": np.array([True, False]),
        "f16": np.array([0.5, -1.0], dtype=np.float16),
        "scalar_f32": np.float32(1.5),
        "scalar_i64": np.int64(-9),
        "empty": np.zeros((0, 2), dtype=np.float32),
    })


def rounding():
    """torch's own f32 -> f16/bf16 rounding, to test ours against (ties, subnormals, overflow)."""
    g = torch.Generator().manual_seed(4)
    parts = [
        torch.randn(400, generator=g) * 10.0 ** torch.randint(-9, 6, (400,), generator=g).float(),
        # Values just around f16 ties: 1 + k/2048 for odd k (exact ties) and neighbours.
        1.0 + torch.arange(0, 64).float() / 2048.0,
        torch.tensor([65504.0, 65519.99, 65520.0, 1e-8, 2.9802322e-08, 5.9604645e-08, -0.0, 0.0, 1e30, -1e30]),
    ]
    x = torch.cat(parts).float()
    x = torch.cat([x, torch.nextafter(x, torch.full_like(x, float("inf")))])
    save("rounding", {"f32": x, "f16": x.half(), "bf16": x.bfloat16()})


def hostile():
    # os.system("echo pwned") via GLOBAL + REDUCE, as a pickle exploit would do.
    cmd = b"echo pwned"
    p = b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R."
    hand_zip("malicious", p)
    # builtins.eval via protocol-4 STACK_GLOBAL, hidden inside a dict value.
    def su(s):
        return b"\x8c" + bytes([len(s)]) + s
    p = b"\x80\x04}(" + su(b"id") + su(b"builtins") + su(b"eval") + b"\x93" + su(b"1+1") + b"\x85Ru."
    hand_zip("malicious_stack_global", p)
    path = os.path.join(OUT, "legacy.bin")
    torch.save({"id": torch.ones(1, 4)}, path, _use_new_zipfile_serialization=False)
    print(f"wrote {path} (legacy format)")


def norm(j):
    """Compare floats by value: Rust and Python spell some differently (1e300 / 1e+300)."""
    if isinstance(j, dict):
        return {k: (float(v) if k == "float" else norm(v)) for k, v in j.items()}
    if isinstance(j, list):
        return [norm(x) for x in j]
    return j


def check(path):
    """torch.load(path) must equal path.json (as written by the Rust test export_for_torch_check)."""
    with open(path + ".json") as f:
        expected = norm(json.load(f))
    got = norm(enc(torch.load(path, weights_only=True)))
    if got != expected:
        print(json.dumps(got)[:2000])
        sys.exit(f"{path}: torch.load result differs from {path}.json")
    # mmap loading needs the 64-byte data alignment torch writes.
    got = norm(enc(torch.load(path, weights_only=True, mmap=True)))
    if got != expected:
        sys.exit(f"{path}: torch.load(mmap=True) result differs from {path}.json")
    print(f"{path}: torch {torch.__version__} torch.load(weights_only=True) and mmap=True match {path}.json")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", metavar="FILE", nargs="+", help="verify FILE loads in torch and equals FILE.json")
    args = ap.parse_args()
    if args.check:
        for path in args.check:
            check(path)
        return
    os.makedirs(OUT, exist_ok=True)
    faceid()
    ip_adapter()
    views()
    parameters()
    numpy_extras()
    rounding()
    hostile()


if __name__ == "__main__":
    main()
