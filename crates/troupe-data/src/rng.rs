//! Counter-based randomness: every random choice is a pure function of (seed, purpose, position),
//! so a resumed run makes exactly the choices the uninterrupted run would have made, whatever
//! thread computes them.
//!
//! Hand-written (SplitMix64 finaliser as a keyed hash) rather than taken from `rand`, because the
//! exact stream is part of our resume contract and must not change with a dependency upgrade.

/// Mixes a 64-bit value (the SplitMix64 finaliser; a bijection with good avalanche).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a stream of random numbers is used for; keeps streams for different purposes independent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    /// Order of shards in an epoch.
    ShardOrder = 1,
    /// Order of row groups inside one shard in an epoch.
    RowGroupOrder = 2,
    /// Permutation of one shuffle window.
    Window = 3,
    /// Per-sample augmentation and dropout decisions.
    Sample = 4,
    /// Training-step randomness (diffusion noise, timesteps, token-group dropout).
    Train = 5,
    /// Generation: initial latents and stochastic-sampler noise.
    Generate = 6,
    /// Validation loss: fixed noise per held-out batch.
    Validation = 7,
    /// Order in which `data pack` and `data import-storymaker` write rows.
    RowOrder = 8,
}

/// A small deterministic generator keyed by (seed, purpose, a, b).
#[derive(Debug, Clone)]
pub struct KeyedRng {
    state: u64,
}

impl KeyedRng {
    /// The stream for `purpose` at coordinates (a, b), e.g. (epoch, index).
    pub fn new(seed: u64, purpose: Purpose, a: u64, b: u64) -> Self {
        let k = mix(seed ^ 0x5452_4f55_5045_0001);
        let k = mix(k ^ (purpose as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let k = mix(k ^ a.wrapping_mul(0xd1b5_4a32_d192_ed03));
        let k = mix(k ^ b.wrapping_mul(0x8cb9_2ba7_2f3d_8dd7));
        Self { state: k }
    }

    /// Next 64 random bits (SplitMix64 step).
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform_range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [0, n) without modulo bias (Lemire's method). `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// `n` standard normal samples (Box–Muller on pairs of uniforms).
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1 = self.uniform().max(f64::MIN_POSITIVE);
            let u2 = self.uniform();
            let r = (-2.0 * u1.ln()).sqrt();
            let a = 2.0 * std::f64::consts::PI * u2;
            out.push((r * a.cos()) as f32);
            out.push((r * a.sin()) as f32);
        }
        out.truncate(n);
        out
    }

    /// Fisher–Yates shuffle in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_independent() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = KeyedRng::new(7, Purpose::Sample, 3, 9);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = KeyedRng::new(7, Purpose::Sample, 3, 9);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        for other in [
            KeyedRng::new(8, Purpose::Sample, 3, 9),
            KeyedRng::new(7, Purpose::Window, 3, 9),
            KeyedRng::new(7, Purpose::Sample, 9, 3),
        ] {
            let mut o = other;
            assert_ne!(a[0], o.next_u64());
        }
    }

    #[test]
    fn shuffle_is_a_permutation_and_below_is_uniform() {
        let mut r = KeyedRng::new(1, Purpose::Window, 0, 0);
        let mut v: Vec<u32> = (0..1000).collect();
        r.shuffle(&mut v);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..1000).collect::<Vec<_>>());
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[r.below(6) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_400..10_600).contains(&c)),
            "{counts:?}"
        );
    }
}
