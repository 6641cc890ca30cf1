#!/usr/bin/env python3
"""Checks that shards read with pyarrow and with Hugging Face `datasets` (images decoded).

    python scripts/check_hf_readable.py datasets/tiny
"""

import glob
import os
import sys

import datasets
import pyarrow.parquet as pq


def main(folder):
    files = sorted(glob.glob(os.path.join(folder, "*.parquet")))
    rows = sum(pq.read_table(f).num_rows for f in files)
    meta = pq.ParquetFile(files[0]).metadata.metadata
    print(f"pyarrow: {len(files)} shards, {rows} rows, schema version {meta[b'troupe.schema_version'].decode()}")
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(ds) == rows
    assert isinstance(ds.features["image"], datasets.Image), ds.features["image"]
    r = ds[0]
    assert r["image"].size == (r["width"], r["height"])
    assert r["characters"][0]["mask"].size == r["image"].size
    print(f"datasets {datasets.__version__}: {len(ds)} rows; image {r['image'].size} decoded; "
          f"{len(r['characters'])} characters; mask mode {r['characters'][0]['mask'].mode}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "datasets/tiny")
