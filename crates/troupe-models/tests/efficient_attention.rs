//! The recomputing attention op against the plain softmax attention that burn's autodiff
//! differentiates op by op: outputs and every input gradient agree to 1e-5 (f32), for shapes
//! whose block size does not divide the query count, with and without a key bias.

mod common;
use common::max_abs_diff;

use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::softmax;
use troupe_models::efficient_attention::{default_block_rows, efficient_attention};

/// `softmax(q kᵀ/√d + bias) v`, every step an ordinary differentiable op.
fn plain(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Option<Tensor<2>>) -> Tensor<4> {
    let [b, h, nq, d] = q.dims();
    let nk = k.dims()[2];
    let mut s = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar((d as f64).powf(-0.5));
    if let Some(bias) = bias {
        s = s + bias.reshape([b, 1, 1, nk]).expand([b, h, nq, nk]);
    }
    softmax(s, 3).matmul(v)
}

struct Case {
    shape: [usize; 6], // B, H, Nq, Nk, d, dv
    block_rows: usize,
    bias: bool,
}

fn check(case: &Case) {
    let [b, h, nq, nk, d, dv] = case.shape;
    let dev = Device::flex().autodiff();
    let rand = |s: [usize; 4]| Tensor::<4>::random(s, Distribution::Normal(0.0, 1.0), &dev);
    let (q, k, v) = (
        rand([b, h, nq, d]),
        rand([b, h, nk, d]),
        rand([b, h, nk, dv]),
    );
    // A padding-like bias: some keys pushed far down, the rest small.
    let bias = case.bias.then(|| {
        let mut values = Vec::new();
        for i in 0..b * nk {
            values.push(if i % 3 == 2 {
                -1e4
            } else {
                0.1 * (i % 5) as f32
            });
        }
        Tensor::<1>::from_floats(values.as_slice(), &dev).reshape([b, nk])
    });
    let weight = rand([b, h, nq, dv]); // loss = Σ out ∘ weight: a dense output gradient
    let run = |fast: bool| {
        let (q, k, v) = (
            q.clone().require_grad(),
            k.clone().require_grad(),
            v.clone().require_grad(),
        );
        let bias = bias.clone().map(|t| t.require_grad());
        let out = if fast {
            efficient_attention(
                q.clone(),
                k.clone(),
                v.clone(),
                bias.clone(),
                case.block_rows,
            )
        } else {
            plain(q.clone(), k.clone(), v.clone(), bias.clone())
        };
        let grads = (out.clone() * weight.clone()).sum().backward();
        let g = |t: &Tensor<4>| t.grad(&grads).expect("input gradient");
        let g_bias = bias.map(|t| t.grad(&grads).expect("bias gradient"));
        (out.inner(), g(&q), g(&k), g(&v), g_bias)
    };
    let (fast, plain) = (run(true), run(false));
    let at = |what: &str| {
        format!(
            "{what} for shape {:?} block {} bias {}",
            case.shape, case.block_rows, case.bias
        )
    };
    for (name, a, b) in [
        ("out", fast.0, plain.0),
        ("dq", fast.1, plain.1),
        ("dk", fast.2, plain.2),
        ("dv", fast.3, plain.3),
    ] {
        let diff = max_abs_diff(a, b);
        assert!(diff <= 1e-5, "{}: max |diff| {diff}", at(name));
    }
    assert_eq!(fast.4.is_some(), case.bias, "{}", at("dbias"));
    if let (Some(a), Some(b)) = (fast.4, plain.4) {
        let diff = max_abs_diff(a, b);
        assert!(diff <= 1e-5, "{}: max |diff| {diff}", at("dbias"));
    }
}

#[test]
fn outputs_and_gradients_match_plain_attention() {
    let cases = [
        // Self-attention; blocks of 7 over 50 queries leave a last block of 1.
        Case {
            shape: [2, 3, 50, 50, 8, 8],
            block_rows: 7,
            bias: false,
        },
        // Cross-attention to a few tokens (the image branch), padding bias, ragged blocks.
        Case {
            shape: [2, 2, 37, 12, 16, 16],
            block_rows: 5,
            bias: true,
        },
        // One block covering everything, value width differing from the key width.
        Case {
            shape: [1, 4, 33, 20, 8, 12],
            block_rows: 64,
            bias: true,
        },
        // Large enough for flex's flash forward (Nq·Nk > 256k) and the default block size.
        Case {
            shape: [1, 2, 600, 520, 8, 8],
            block_rows: default_block_rows(1, 2, 520).min(97),
            bias: false,
        },
    ];
    for case in &cases {
        check(case);
    }
}

#[test]
fn inference_device_gives_the_plain_output() {
    let dev = Device::flex();
    let rand = |s: [usize; 4]| Tensor::<4>::random(s, Distribution::Normal(0.0, 1.0), &dev);
    let (q, k, v) = (rand([1, 2, 30, 8]), rand([1, 2, 9, 8]), rand([1, 2, 9, 8]));
    let bias = Tensor::<2>::zeros([1, 9], &dev) - 1.0;
    let fast = efficient_attention(q.clone(), k.clone(), v.clone(), Some(bias.clone()), 4);
    let diff = max_abs_diff(fast, plain(q, k, v, Some(bias)));
    assert!(diff <= 1e-5, "max |diff| {diff}");
}
