//! LoRA served per row equals the base model with the adapter merged into its weights.

use candle_core::{Device, Tensor};
use runtime::llama::{Llama, Row, SeqCache};
use runtime::lora::AdapterWeights;
use runtime::testing::{write_random_adapter, write_tiny_llama};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn setup() -> (tempfile::TempDir, Llama, AdapterWeights, AdapterWeights, AdapterWeights) {
    let dir = tempfile::tempdir().unwrap();
    let shape = write_tiny_llama(&dir.path().join("model"), 7).unwrap();
    let model = Llama::from_hf_dir(&dir.path().join("model")).unwrap();
    let load = |name: &str, seed: u64, zero: bool| {
        let path = dir.path().join(name);
        write_random_adapter(&path, &shape, 4, seed, zero).unwrap();
        adapters::validate_adapter_dir(&path, &shape, &adapters::Limits::default()).unwrap();
        AdapterWeights::load_peft_dir(&path, &shape, &Device::Cpu).unwrap()
    };
    let one = load("one", 100, false);
    let two = load("two", 200, false);
    let zero = load("zero", 300, true);
    (dir, model, one, two, zero)
}

fn tokens(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

#[test]
fn adapter_logits_equal_merged_weights() {
    let (_dir, model, one, _, _) = setup();
    let input = tokens(&[1, 40, 41, 42, 5, 6, 7, 2]);
    let served = model.forward_full(&input, Some(&one)).unwrap();
    let merged = model.merged(&one).unwrap().forward_full(&input, None).unwrap();
    let base = model.forward_full(&input, None).unwrap();
    assert!(max_diff(&served, &merged) < 1e-4, "adapter vs merged: {}", max_diff(&served, &merged));
    assert!(max_diff(&served, &base) > 1e-2, "the adapter must change the logits");
}

#[test]
fn zero_adapter_equals_the_base() {
    let (_dir, model, _, _, zero) = setup();
    let input = tokens(&[1, 10, 11, 12, 2]);
    let served = model.forward_full(&input, Some(&zero)).unwrap();
    let base = model.forward_full(&input, None).unwrap();
    assert!(max_diff(&served, &base) < 1e-6);
}

#[test]
fn one_batch_serves_different_adapters_per_row() {
    let (_dir, model, one, two, _) = setup();
    let prompt = [1u32, 40, 41, 42, 43];
    let adapters: [Option<&AdapterWeights>; 3] = [Some(&one), None, Some(&two)];
    // Each row alone, through its own cache.
    let mut alone = Vec::new();
    let mut caches: Vec<SeqCache> = Vec::new();
    for a in adapters {
        let mut cache = SeqCache::new(model.config.num_layers);
        model.forward_cached(&tokens(&prompt), &[Row { adapter: a }], &mut [&mut cache], true).unwrap();
        let step = model.forward_cached(&tokens(&[44]), &[Row { adapter: a }], &mut [&mut cache], true).unwrap();
        alone.push(step);
        let mut fresh = SeqCache::new(model.config.num_layers);
        model.forward_cached(&tokens(&prompt), &[Row { adapter: a }], &mut [&mut fresh], true).unwrap();
        caches.push(fresh);
    }
    // The same decode step for all three rows in one batch.
    let rows: Vec<Row<'_>> = adapters.iter().map(|a| Row { adapter: *a }).collect();
    let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
    let input = Tensor::new(&[44u32, 44, 44], &Device::Cpu).unwrap().unsqueeze(1).unwrap();
    let batched = model.forward_cached(&input, &rows, &mut refs, true).unwrap();
    for (i, a) in alone.iter().enumerate() {
        let d = max_diff(&batched.get(i).unwrap(), &a.squeeze(0).unwrap());
        assert!(d < 1e-4, "row {i} differs by {d}");
    }
    assert!(
        max_diff(&batched.get(0).unwrap(), &batched.get(2).unwrap()) > 1e-3,
        "different adapters, different logits"
    );
}
