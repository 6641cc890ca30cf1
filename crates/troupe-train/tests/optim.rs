//! AdamW against `torch.optim.AdamW` (fixture: `scripts/make_optim_fixtures.py`), global-norm
//! clipping and the learning-rate schedules.

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::prelude::*;
use troupe_train::optim::{
    AdamW, AdamWConfig, LearningRates, LrSchedule, ParamNames, clip_grad_norm,
};

fn linear_with(values: &[f32], device: &Device) -> Linear {
    let mut l: Linear = LinearConfig::new(4, 3).with_bias(false).init(device);
    l.weight = Param::from_tensor(Tensor::from_data(
        TensorData::new(values.to_vec(), [3, 4]),
        device,
    ));
    l
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn adamw_matches_pytorch() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/adamw.json");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let device = Device::flex();
    let mut l = linear_with(&floats(&fx["init"]), &device);
    let mut names = ParamNames::default();
    names.add(vec![("weight".into(), l.weight.id)], "g");
    let mut opt = AdamW::new(AdamWConfig::default());
    for (i, step) in fx["steps"].as_array().unwrap().iter().enumerate() {
        let mut grads = GradientsParams::new();
        grads.register(
            l.weight.id,
            Tensor::<2>::from_data(TensorData::new(floats(&step["grad"]), [3, 4]), &device),
        );
        let lrs = [("g".to_string(), step["lr"].as_f64().unwrap())].into();
        l = opt.step(l, &names, &mut grads, &lrs);
        let got = l.weight.val().into_data().try_to_vec::<f32>().unwrap();
        let want = floats(&step["param"]);
        let err = troupe_pt::parity::max_abs_diff(&got, &want, "param");
        assert!(err <= 2e-6, "step {i}: max abs error {err}");
    }
    assert_eq!(opt.step, 4);
    assert!(opt.state.contains_key("weight"));
}

#[test]
fn global_norm_clipping_scales_all_gradients_together() {
    let device = Device::flex();
    // Two parameters in two learning-rate groups: the norm is over both, and both are scaled
    // by the same factor (each alone is under the limit; together they are not).
    let l: Linear = LinearConfig::new(4, 3).init(&device);
    let bias = l.bias.as_ref().unwrap();
    let mut names = ParamNames::default();
    names.add(vec![("weight".into(), l.weight.id)], "ppr");
    names.add(vec![("bias".into(), bias.id)], "processors");
    let mut grads = GradientsParams::new();
    // 12 entries of 0.5 (norm √3) and 3 of 1.0 (norm √3): together √6 ≈ 2.45.
    grads.register(
        l.weight.id,
        Tensor::<2>::ones([3, 4], &device).mul_scalar(0.5),
    );
    grads.register(bias.id, Tensor::<1>::ones([3], &device));
    let norm = clip_grad_norm(&l, &names, &mut grads, Some(2.0));
    assert!((norm - 6f64.sqrt()).abs() < 1e-5, "norm {norm}");
    let factor = (2.0 / 6f64.sqrt()) as f32;
    let w: Tensor<2> = grads.get(l.weight.id).unwrap();
    let b: Tensor<1> = grads.get(bias.id).unwrap();
    let (w, b) = (
        w.into_data().try_to_vec::<f32>().unwrap(),
        b.into_data().try_to_vec::<f32>().unwrap(),
    );
    assert!(w.iter().all(|v| (v - 0.5 * factor).abs() < 1e-6), "{w:?}");
    assert!(b.iter().all(|v| (v - factor).abs() < 1e-6), "{b:?}");
    // Below the limit: untouched.
    let norm = clip_grad_norm(&l, &names, &mut grads, Some(10.0));
    assert!((norm - 2.0).abs() < 1e-4);
}

#[test]
fn schedules() {
    assert_eq!(LrSchedule::Constant.factor(123), 1.0);
    let w = LrSchedule::LinearWarmup { warmup_steps: 4 };
    assert_eq!(
        [w.factor(0), w.factor(1), w.factor(3), w.factor(10)],
        [0.25, 0.5, 1.0, 1.0]
    );
    let c = LrSchedule::Cosine {
        warmup_steps: 0,
        total_steps: 100,
        min_ratio: 0.1,
    };
    assert!(
        (c.factor(0) - 1.0).abs() < 1e-12
            && (c.factor(50) - 0.55).abs() < 1e-12
            && (c.factor(100) - 0.1).abs() < 1e-12
    );
    let p = LrSchedule::Piecewise {
        boundaries: vec![4000],
        factors: vec![0.5],
    };
    assert_eq!([p.factor(3999), p.factor(4000)], [1.0, 0.5]);
    let bad = LrSchedule::Piecewise {
        boundaries: vec![10, 5],
        factors: vec![1.0, 1.0],
    };
    assert!(bad.validate().unwrap_err().contains("increase"));
}

#[test]
fn two_groups_get_their_own_rates_and_the_state_survives_save_and_restore() {
    let device = Device::flex();
    let fresh = || {
        device.seed(0); // the same initial weights each time
        let l: Linear = LinearConfig::new(4, 3).init(&device);
        let mut names = ParamNames::default();
        names.add(vec![("weight".into(), l.weight.id)], "ppr");
        names.add(
            vec![("bias".into(), l.bias.as_ref().unwrap().id)],
            "processors",
        );
        (l, names)
    };
    let lrs: LearningRates = [("ppr".to_string(), 0.1), ("processors".to_string(), 0.01)].into();
    let step = |opt: &mut AdamW, l: Linear, names: &ParamNames, k: usize| {
        let mut grads = GradientsParams::new();
        let g = (k as f32 + 1.0) * 0.3;
        grads.register(
            l.weight.id,
            Tensor::<2>::ones([3, 4], &device).mul_scalar(g),
        );
        grads.register(
            l.bias.as_ref().unwrap().id,
            Tensor::<1>::ones([3], &device).mul_scalar(-g),
        );
        opt.step(l, names, &mut grads, &lrs)
    };
    let values = |l: &Linear| {
        let w = l.weight.val().into_data().try_to_vec::<f32>().unwrap();
        let b = l
            .bias
            .as_ref()
            .unwrap()
            .val()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        (w, b)
    };
    // First AdamW step moves each parameter by about its group's rate (m̂/√v̂ = ±1).
    let (l, names) = fresh();
    let (w0, b0) = values(&l);
    let mut opt = AdamW::new(AdamWConfig::default());
    let l = step(&mut opt, l, &names, 0);
    let (w1, b1) = values(&l);
    assert!(
        w0.iter()
            .zip(&w1)
            .all(|(a, b)| ((a - b).abs() - 0.1).abs() < 2e-3),
        "{w0:?} → {w1:?}"
    );
    assert!(
        b0.iter()
            .zip(&b1)
            .all(|(a, b)| ((a - b).abs() - 0.01).abs() < 2e-4),
        "{b0:?} → {b1:?}"
    );
    // Four steps straight, against two, a save and a restore by name, and two more.
    let mut l = l;
    for k in 1..4 {
        l = step(&mut opt, l, &names, k);
    }
    let straight = values(&l);
    let (l, names) = fresh();
    let mut opt = AdamW::new(AdamWConfig::default());
    let mut l = step(&mut opt, l, &names, 0);
    l = step(&mut opt, l, &names, 1);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("optimizer.safetensors");
    opt.save(&path).unwrap();
    let mut restored = AdamW::load(AdamWConfig::default(), &path, &device).unwrap();
    assert_eq!(restored.step, 2);
    for k in 2..4 {
        l = step(&mut restored, l, &names, k);
    }
    assert_eq!(
        values(&l),
        straight,
        "a restored optimizer continues exactly"
    );
}

#[test]
fn clipping_off_leaves_gradients_untouched() {
    let device = Device::flex();
    let a = linear_with(&[0.0; 12], &device);
    let mut names = ParamNames::default();
    names.add(vec![("weight".into(), a.weight.id)], "g");
    let mut grads = GradientsParams::new();
    grads.register(
        a.weight.id,
        Tensor::<2>::ones([3, 4], &device).mul_scalar(1e6),
    );
    let norm = clip_grad_norm(&a, &names, &mut grads, None);
    assert!(
        (norm - 1e6 * 12f64.sqrt()).abs() / norm < 1e-6,
        "the norm is still reported"
    );
    let g: Tensor<2> = grads.get(a.weight.id).unwrap();
    let g = g.into_data().try_to_vec::<f32>().unwrap();
    assert!(g.iter().all(|&v| v == 1e6), "{g:?}");
}
