//! The DDPM schedule equals diffusers' `DDPMScheduler.alphas_cumprod` bit for bit.
//! Fixture: `scripts/make_ddpm_fixtures.py`.

use troupe_diffusion::schedule::{NoiseSchedule, Prediction, SchedulerConfig};

#[test]
fn alphas_cumprod_match_diffusers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ddpm.json");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (name, case) in all.as_object().unwrap() {
        let config: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let ddpm = NoiseSchedule::new(&config).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["alphas_cumprod_bits"].clone()).unwrap();
        let got: Vec<u32> = ddpm.alphas_cumprod.iter().map(|a| a.to_bits()).collect();
        assert_eq!(got.len(), want.len(), "{name}");
        if !config.rescale_betas_zero_snr {
            assert_eq!(got, want, "{name}: bit for bit");
            continue;
        }
        // Zero-terminal-SNR rescaling differs from PyTorch in the last bits (its element-wise
        // kernels round differently, and cumprod compounds it): relative to each value, so the
        // last steps (ᾱ of 2e-7 … 2.5e-5) are held as tightly as the first.
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            let (g, w) = (f32::from_bits(*g) as f64, f32::from_bits(*w) as f64);
            let rel = if w == 0.0 {
                g.abs()
            } else {
                ((g - w) / w).abs()
            };
            assert!(
                rel <= 1e-5,
                "{name}: t = {t}: {g} vs {w} (relative {rel:.2e})"
            );
        }
    }
}

#[test]
fn sdxl_defaults_and_min_snr_weights() {
    let ddpm = NoiseSchedule::new(&SchedulerConfig::sdxl()).unwrap();
    assert_eq!(ddpm.steps(), 1000);
    assert_eq!(ddpm.prediction, Prediction::Epsilon);
    // High SNR at t = 0 is clipped to γ; at t = 999 SNR < γ, so the weight is 1.
    // ᾱ₀ = 1 − β₀ = 1 − 0.00085 (scaled_linear starts at β = 0.00085): SNR₀ = ᾱ₀ / (1 − ᾱ₀).
    let snr0 = (1.0 - 0.00085) / 0.00085;
    let w0 = ddpm.min_snr_weight(0, 5.0);
    assert!(
        (w0 as f64 - 5.0 / snr0).abs() < 1e-6,
        "{w0} vs {}",
        5.0 / snr0
    );
    assert_eq!(ddpm.min_snr_weight(999, 5.0), 1.0);
}

#[test]
fn unknown_schedule_is_named() {
    let mut c = SchedulerConfig::sdxl();
    c.beta_schedule = "squaredcos_cap_v2".into();
    let err = NoiseSchedule::new(&c).unwrap_err();
    assert!(
        err.contains("beta_schedule") && err.contains("squaredcos_cap_v2"),
        "{err}"
    );
}

#[test]
fn noising_v_target_and_snr_match_diffusers() {
    // The objective noises `x0·√ᾱ + ε·√(1−ᾱ)` and targets `v = ε·√ᾱ − x0·√(1−ᾱ)` with
    // `coefficients(t)`; diffusers' `add_noise`, `get_velocity` and `compute_snr` on the
    // same values. PyTorch's `ᾱ ** 0.5` is one ulp off the correctly rounded square root at
    // some t (sdxl, t = 500: 0.52567339 vs 0.52567333), so values agree to a few ulps, not
    // bit for bit; anything more (a wrong ᾱ index, a swapped coefficient) is far outside.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ddpm.json");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| f32::from_bits(b.as_u64().unwrap() as u32))
            .collect()
    };
    for (name, case) in all.as_object().unwrap() {
        let config: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let ddpm = NoiseSchedule::new(&config).unwrap();
        let (x0, noise) = (floats(&case["x0_bits"]), floats(&case["noise_bits"]));
        let (noisy, velocity, snr) = (
            floats(&case["add_noise_bits"]),
            floats(&case["velocity_bits"]),
            floats(&case["snr_bits"]),
        );
        let ts: Vec<usize> = serde_json::from_value(case["timesteps"].clone()).unwrap();
        for (row, &t) in ts.iter().enumerate() {
            let (sa, sn) = ddpm.coefficients(t);
            for i in 0..x0.len() {
                let k = row * x0.len() + i;
                let close = |got: f32, want: f32| {
                    (got - want).abs() <= 4.0 * f32::EPSILON * want.abs().max(1.0)
                };
                let got = x0[i] * sa + noise[i] * sn;
                assert!(
                    close(got, noisy[k]),
                    "{name} t={t}: add_noise {got} vs {}",
                    noisy[k]
                );
                let got = noise[i] * sa - x0[i] * sn;
                let want = velocity[k];
                assert!(close(got, want), "{name} t={t}: velocity {got} vs {want}");
            }
            let (got, want) = (ddpm.snr(t), snr[row]);
            assert!(
                got == want || ((got - want) / want).abs() <= 1e-6 || (got - want).abs() <= 1e-12,
                "{name} t={t}: snr {got} vs {want}"
            );
        }
    }
}
