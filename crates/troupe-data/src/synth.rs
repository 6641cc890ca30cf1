//! Synthetic datasets (tiny fixtures, benchmark shards).
