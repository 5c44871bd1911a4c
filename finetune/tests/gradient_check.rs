//! The LoRA gradients candle computes (through the frozen-linear op that skips base-weight
//! gradients) match central finite differences on a tiny model, and match candle's own
//! matmul backward on dense weights.

use adapters::LoraModule;
use candle_core::{Tensor, Var};
use finetune::train::batch::{Batch, Seq};
use finetune::train::params::LoraParams;
use runtime::llama::Llama;

fn loss(model: &Llama, params: &LoraParams, batch: &Batch) -> Tensor {
    let adapter = params.adapter(true);
    let lp = batch.token_logprobs(model, Some(&adapter)).unwrap();
    (lp.sum_all().unwrap().neg().unwrap() / batch.scored as f64).unwrap()
}

fn value(t: &Tensor) -> f64 {
    t.to_scalar::<f32>().unwrap() as f64
}

#[test]
fn lora_gradients_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let shape = runtime::testing::write_tiny_llama(dir.path(), 11).unwrap();
    let dense = Llama::from_hf_dir(dir.path()).unwrap().with_autograd();
    let frozen = dense.for_training().unwrap();
    let params = LoraParams::init(&shape, &LoraModule::ALL, 2, 3.0, false, 0.0, 5).unwrap();
    // B starts at zero, which would make every gradient of A zero: give it values first.
    for (i, e) in params.entries.iter().enumerate() {
        let (out, r) = e.b.as_tensor().dims2().unwrap();
        let v = runtime::testing::values(out * r, 100 + i as u64, 0.3);
        e.b.set(&Tensor::from_vec(v, (out, r), &candle_core::Device::Cpu).unwrap()).unwrap();
    }
    let seqs = [
        Seq { ids: vec![1, 10, 20, 30, 2, 40, 41, 42], answer_start: 5 },
        Seq { ids: vec![1, 12, 13, 2, 50, 51], answer_start: 4 },
    ];
    let batch = Batch::new(&[&seqs[0], &seqs[1]]).unwrap();

    let grads = loss(&frozen, &params, &batch).backward().unwrap();
    let dense_grads = loss(&dense, &params, &batch).backward().unwrap();
    let grad_of = |var: &Var| {
        grads
            .get(var.as_tensor())
            .expect("every LoRA weight gets a gradient")
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let vars: Vec<&Var> = params.entries.iter().flat_map(|e| [&e.a, &e.b]).collect();

    // The frozen-linear op's input gradient agrees with candle's own matmul backward.
    for var in &vars {
        let gd = dense_grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (x, y) in grad_of(var).iter().zip(&gd) {
            assert!((x - y).abs() <= 1e-6 + 1e-3 * y.abs(), "frozen-op gradient {x} vs candle matmul {y}");
        }
    }

    // Directional derivatives: moving a matrix by ε along its gradient direction changes the
    // loss by ε·|g|. Summing over a whole matrix keeps the signal far above the f32 loss's
    // rounding (~1e-5 in a central difference with ε = 0.05).
    let eps = 0.05f64;
    let (mut checked, mut worst) = (0, 0.0f64);
    for (n, var) in vars.iter().enumerate() {
        let g = grad_of(var);
        let norm = g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        if norm < 1e-3 {
            continue;
        }
        let orig = var.as_tensor().copy().unwrap();
        let dir = Tensor::from_vec(
            g.iter().map(|v| (*v as f64 / norm) as f32).collect::<Vec<_>>(),
            orig.shape(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        var.set(&(&orig + (&dir * eps).unwrap()).unwrap()).unwrap();
        let up = value(&loss(&frozen, &params, &batch));
        var.set(&(&orig - (&dir * eps).unwrap()).unwrap()).unwrap();
        let down = value(&loss(&frozen, &params, &batch));
        var.set(&orig).unwrap();
        let numeric = (up - down) / (2.0 * eps);
        let err = (numeric - norm).abs() / norm;
        worst = worst.max(err);
        assert!(err < 2e-2, "matrix {n}: |g| {norm:.6e} vs finite difference {numeric:.6e}");
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} matrices had gradients large enough to check");

    // And one random direction through every LoRA weight at once: ε·Σ g·r.
    let mut analytic = 0.0f64;
    let mut dirs = Vec::new();
    for (k, var) in vars.iter().enumerate() {
        let g = grad_of(var);
        let r = runtime::testing::values(g.len(), 900 + k as u64, 1.0);
        analytic += g.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
        dirs.push(Tensor::from_vec(r, var.as_tensor().shape(), &candle_core::Device::Cpu).unwrap());
    }
    let originals: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let step = 0.01;
    let shift = |sign: f64| {
        for ((var, o), d) in vars.iter().zip(&originals).zip(&dirs) {
            var.set(&(o + (d * (sign * step)).unwrap()).unwrap()).unwrap();
        }
        value(&loss(&frozen, &params, &batch))
    };
    let numeric = (shift(1.0) - shift(-1.0)) / (2.0 * step);
    for (var, o) in vars.iter().zip(&originals) {
        var.set(o).unwrap();
    }
    assert!(
        (numeric - analytic).abs() <= 2e-2 * analytic.abs(),
        "random direction: analytic {analytic:.6e} vs numeric {numeric:.6e}"
    );
    eprintln!("{checked} LoRA matrices checked by directional finite differences (worst relative error {worst:.2e}); random direction through all {} matrices: analytic {analytic:.6e}, numeric {numeric:.6e}", vars.len());
}
