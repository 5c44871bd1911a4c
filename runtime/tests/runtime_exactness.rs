//! The serving runtime computes what the candle reference computes: per position, per
//! adapter, with mixed prompt chunks and decode tokens in one step.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use runtime::llama::{KvCache, Llama, PrefixCache, Runtime, SeqInput, Workspace};
use runtime::lora::AdapterWeights;
use runtime::testing::{write_random_adapter, write_tiny_llama};

struct Setup {
    _dir: tempfile::TempDir,
    model: Llama,
    runtime: Runtime,
    one: AdapterWeights,
    two: AdapterWeights,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let shape = write_tiny_llama(&dir.path().join("model"), 11).unwrap();
    let model = Llama::from_hf_dir(&dir.path().join("model")).unwrap();
    let load = |name: &str, seed: u64| {
        let path = dir.path().join(name);
        write_random_adapter(&path, &shape, 4, seed, false).unwrap();
        AdapterWeights::load_peft_dir(&path, &shape, &Device::Cpu).unwrap()
    };
    let (one, two) = (load("one", 1), load("two", 2));
    let runtime = Runtime::from_llama(&model, 2).unwrap();
    Setup { _dir: dir, model, runtime, one, two }
}

/// Reference logits of every position, `[t][vocab]`, from the uncached candle forward of the
/// merged model.
fn reference(model: &Llama, ids: &[u32], adapter: Option<&AdapterWeights>) -> Vec<Vec<f32>> {
    let merged = match adapter {
        Some(a) => model.merged(a).unwrap(),
        None => model.clone(),
    };
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    merged.forward_full(&input, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    let d = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d < 1e-4, "{what}: differs by {d}");
}

#[test]
fn token_by_token_decoding_equals_the_merged_reference() {
    let s = setup();
    let ids = [1u32, 40, 41, 42, 5, 6, 7, 2, 9, 10];
    for adapter in [None, Some(&s.one)] {
        let want = reference(&s.model, &ids, adapter);
        let mut cache = KvCache::new(&s.runtime.config, ids.len());
        let mut ws = Workspace::default();
        let mut logits = Vec::new();
        for (p, t) in ids.iter().enumerate() {
            let mut step = [SeqInput {
                tokens: std::slice::from_ref(t),
                cache: &mut cache,
                adapter,
                logits: true,
                all_logits: false,
            }];
            s.runtime.forward(&mut ws, &mut step, &mut logits).unwrap();
            assert_close(&logits, &want[p], &format!("position {p}, adapter {}", adapter.is_some()));
        }
    }
}

#[test]
fn a_chunked_prompt_equals_the_whole_prompt() {
    let s = setup();
    let ids = [1u32, 40, 41, 42, 5, 6, 7, 2, 9, 10, 11];
    let want = reference(&s.model, &ids, Some(&s.two));
    let mut ws = Workspace::default();
    let mut logits = Vec::new();
    let mut cache = KvCache::new(&s.runtime.config, 16);
    for chunk in [&ids[..4], &ids[4..9], &ids[9..]] {
        let mut step =
            [SeqInput { tokens: chunk, cache: &mut cache, adapter: Some(&s.two), logits: true, all_logits: false }];
        s.runtime.forward(&mut ws, &mut step, &mut logits).unwrap();
    }
    assert_eq!(cache.len(), ids.len());
    assert_close(&logits, &want[ids.len() - 1], "chunked prefill");
}

#[test]
fn one_step_serves_prompts_and_decodes_with_different_adapters() {
    let s = setup();
    let vocab = s.runtime.config.vocab_size;
    let prompt_a = [1u32, 40, 41, 42, 43];
    let prompt_b = [1u32, 12, 13];
    let prompt_c = [1u32, 20, 21, 22, 23, 24, 25];
    // a and b already hold their prompts; c arrives in the same step as their next tokens.
    let mut ws = Workspace::default();
    let mut logits = Vec::new();
    let cfg = &s.runtime.config;
    let (mut ca, mut cb, mut cc) = (KvCache::new(cfg, 16), KvCache::new(cfg, 16), KvCache::new(cfg, 16));
    s.runtime
        .forward(
            &mut ws,
            &mut [
                SeqInput { tokens: &prompt_a, cache: &mut ca, adapter: Some(&s.one), logits: false, all_logits: false },
                SeqInput { tokens: &prompt_b, cache: &mut cb, adapter: None, logits: false, all_logits: false },
            ],
            &mut logits,
        )
        .unwrap();
    assert!(logits.is_empty(), "no sequence asked for logits");
    let mut step = [
        SeqInput { tokens: &[44], cache: &mut ca, adapter: Some(&s.one), logits: true, all_logits: false },
        SeqInput { tokens: &prompt_c, cache: &mut cc, adapter: Some(&s.two), logits: true, all_logits: false },
        SeqInput { tokens: &[14], cache: &mut cb, adapter: None, logits: true, all_logits: false },
    ];
    s.runtime.forward(&mut ws, &mut step, &mut logits).unwrap();
    assert_eq!(logits.len(), 3 * vocab);
    let a: Vec<u32> = prompt_a.iter().copied().chain([44]).collect();
    let b: Vec<u32> = prompt_b.iter().copied().chain([14]).collect();
    assert_close(&logits[..vocab], reference(&s.model, &a, Some(&s.one)).last().unwrap(), "decode row, adapter one");
    assert_close(
        &logits[vocab..2 * vocab],
        reference(&s.model, &prompt_c, Some(&s.two)).last().unwrap(),
        "prompt row, adapter two",
    );
    assert_close(&logits[2 * vocab..], reference(&s.model, &b, None).last().unwrap(), "decode row, base");
}

#[test]
fn bad_steps_are_errors_not_panics() {
    let s = setup();
    let mut ws = Workspace::default();
    let mut logits = Vec::new();
    let mut small = KvCache::new(&s.runtime.config, 2);
    let err = s
        .runtime
        .forward(
            &mut ws,
            &mut [SeqInput { tokens: &[1, 2, 3], cache: &mut small, adapter: None, logits: true, all_logits: false }],
            &mut logits,
        )
        .unwrap_err();
    assert!(err.to_string().contains("cache holds 2"), "{err}");
    let err = s
        .runtime
        .forward(
            &mut ws,
            &mut [SeqInput { tokens: &[999_999], cache: &mut small, adapter: None, logits: true, all_logits: false }],
            &mut logits,
        )
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert_eq!(small.len(), 0, "a refused step leaves the cache as it was");
}

#[test]
fn neighbours_on_one_adapter_share_its_terms_and_stay_exact() {
    // Four sequences side by side on adapter one (their LoRA terms merge into one per module,
    // and at ~200 rows the x·Aᵀ products run across the pool), then one on two and one base.
    let s = setup();
    let vocab = s.runtime.config.vocab_size;
    let prompts: Vec<Vec<u32>> =
        (0..6u32).map(|k| (0..48u32).map(|i| 3 + (i * 7 + k * 11) % (vocab as u32 - 3)).collect()).collect();
    let adapters = [Some(&s.one), Some(&s.one), Some(&s.one), Some(&s.one), Some(&s.two), None];
    let mut caches: Vec<KvCache> = (0..6).map(|_| KvCache::new(&s.runtime.config, 64)).collect();
    let mut ws = Workspace::default();
    let mut logits = Vec::new();
    let mut step: Vec<SeqInput<'_>> = caches
        .iter_mut()
        .zip(&prompts)
        .zip(adapters)
        .map(|((cache, p), adapter)| SeqInput { tokens: p, cache, adapter, logits: true, all_logits: false })
        .collect();
    s.runtime.forward(&mut ws, &mut step, &mut logits).unwrap();
    for (k, (p, adapter)) in prompts.iter().zip(adapters).enumerate() {
        let want = reference(&s.model, p, adapter);
        assert_close(&logits[k * vocab..(k + 1) * vocab], want.last().unwrap(), &format!("prompt of sequence {k}"));
    }
    // One decode token each, in the same grouping.
    let next: Vec<[u32; 1]> = (0..6u32).map(|k| [5 + k]).collect();
    let mut step: Vec<SeqInput<'_>> = caches
        .iter_mut()
        .zip(&next)
        .zip(adapters)
        .map(|((cache, t), adapter)| SeqInput { tokens: t, cache, adapter, logits: true, all_logits: false })
        .collect();
    s.runtime.forward(&mut ws, &mut step, &mut logits).unwrap();
    for (k, ((p, t), adapter)) in prompts.iter().zip(&next).zip(adapters).enumerate() {
        let ids: Vec<u32> = p.iter().copied().chain(t.iter().copied()).collect();
        let want = reference(&s.model, &ids, adapter);
        assert_close(&logits[k * vocab..(k + 1) * vocab], want.last().unwrap(), &format!("decode of sequence {k}"));
    }
}

#[test]
fn bf16_served_weights_are_exact_for_bf16_values_and_close_otherwise() {
    use adapters::peft::LoraModule;
    use runtime::kernels::to_bf16_bits;
    use runtime::lora::{LoraDtype, LoraPair};
    let s = setup();
    let layers = s.runtime.config.num_layers;
    let round = |t: &Tensor| {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let r: Vec<f32> = v.iter().map(|&x| f32::from_bits((to_bf16_bits(x) as u32) << 16)).collect();
        Tensor::from_vec(r, t.shape(), &Device::Cpu).unwrap()
    };
    // Adapter one with its values rounded to bf16, served in both precisions, and adapter one
    // itself served in bf16.
    let build = |rounded: bool, dtype: LoraDtype| {
        let mut pairs = Vec::new();
        for layer in 0..layers {
            for module in LoraModule::ALL {
                if let Some(p) = s.one.pair(layer, module) {
                    let (a, b) = if rounded { (round(&p.a), round(&p.b)) } else { (p.a.clone(), p.b.clone()) };
                    pairs.push((layer, module, LoraPair::frozen_as(a, b, p.scale, dtype).unwrap()));
                }
            }
        }
        AdapterWeights::from_pairs(layers, pairs)
    };
    let (exact_f32, exact_bf16, rounded_on_load) =
        (build(true, LoraDtype::F32), build(true, LoraDtype::Bf16), build(false, LoraDtype::Bf16));
    let ids = [1u32, 40, 41, 42, 5, 6, 7, 2, 9, 10];
    let run = |adapter: &AdapterWeights| {
        let mut cache = KvCache::new(&s.runtime.config, ids.len());
        let (mut ws, mut logits) = (Workspace::default(), Vec::new());
        // The prompt but its last token, then that token alone: prefill and decode paths.
        let mut step = [SeqInput {
            tokens: &ids[..ids.len() - 1],
            cache: &mut cache,
            adapter: Some(adapter),
            logits: false,
            all_logits: false,
        }];
        s.runtime.forward(&mut ws, &mut step, &mut logits).unwrap();
        let mut step = [SeqInput {
            tokens: &ids[ids.len() - 1..],
            cache: &mut cache,
            adapter: Some(adapter),
            logits: true,
            all_logits: false,
        }];
        s.runtime.forward(&mut ws, &mut step, &mut logits).unwrap();
        logits
    };
    let want = reference(&s.model, &ids, Some(&exact_f32));
    assert_close(&run(&exact_f32), want.last().unwrap(), "bf16 values served in f32");
    assert_close(&run(&exact_bf16), want.last().unwrap(), "bf16 values served in bf16");
    // Rounding f32 weights on load moves the logits, but only as far as rounding the weights
    // beforehand does.
    let got = run(&rounded_on_load);
    let full = reference(&s.model, &ids, Some(&s.one));
    let moved = want.last().unwrap().iter().zip(full.last().unwrap()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert_close(
        &got,
        want.last().unwrap(),
        &format!("f32 weights rounded on load (rounding moved the reference by {moved})"),
    );
}

/// Feeds `tokens` to `cache` in one step and returns the last position's logits.
fn feed(s: &Setup, cache: &mut KvCache, tokens: &[u32], adapter: Option<&AdapterWeights>) -> Vec<f32> {
    let (mut ws, mut logits) = (Workspace::default(), Vec::new());
    let mut step = [SeqInput { tokens, cache, adapter, logits: true, all_logits: false }];
    s.runtime.forward(&mut ws, &mut step, &mut logits).unwrap();
    logits
}

#[test]
fn a_restored_prefix_gives_the_logits_of_the_whole_prompt() {
    let s = setup();
    let one = Arc::new(s.one.clone());
    let system = [1u32, 40, 41, 42, 5, 6, 7, 2];
    let question: Vec<u32> = system.iter().copied().chain([9, 10, 11]).collect();
    let cfg = &s.runtime.config;
    let mut prefixes = PrefixCache::new(64 << 20);
    let mut first = KvCache::new(cfg, 16);
    feed(&s, &mut first, &system, Some(&*one));
    prefixes.store(&system, Some(&one), &first);
    assert_eq!(prefixes.len(), 1);
    assert_eq!(prefixes.bytes(), system.len() * first.bytes_per_token());

    // The longer prompt copies the shared 8 positions and computes only its own 3.
    let mut second = KvCache::new(cfg, 16);
    assert_eq!(prefixes.reusable(&question, Some(&one)), system.len());
    assert_eq!(prefixes.restore(&question, Some(&one), &mut second), system.len());
    assert_eq!(second.len(), system.len());
    let got = feed(&s, &mut second, &question[system.len()..], Some(&*one));
    let want = reference(&s.model, &question, Some(&s.one));
    assert_close(&got, want.last().unwrap(), "restored prefix, then the rest");
    // Decoding on from the restored cache stays exact too.
    let got = feed(&s, &mut second, &[12], Some(&*one));
    let longer: Vec<u32> = question.iter().copied().chain([12]).collect();
    assert_close(&got, reference(&s.model, &longer, Some(&s.one)).last().unwrap(), "decode after a restore");

    // The same prompt again: everything but its last token comes from the cache.
    let mut again = KvCache::new(cfg, 16);
    assert_eq!(prefixes.restore(&system, Some(&one), &mut again), system.len() - 1);
    let got = feed(&s, &mut again, &system[system.len() - 1..], Some(&*one));
    assert_close(&got, reference(&s.model, &system, Some(&s.one)).last().unwrap(), "same prompt again");

    // Keys and values computed under an adapter never serve the base or another adapter.
    let two = Arc::new(s.two.clone());
    let mut other = KvCache::new(cfg, 16);
    assert_eq!(prefixes.restore(&question, None, &mut other), 0);
    assert_eq!(prefixes.restore(&question, Some(&two), &mut other), 0);
    assert!(other.is_empty());
}

#[test]
fn the_prefix_cache_keeps_to_its_budget_and_forgets_dropped_adapters() {
    let s = setup();
    let cfg = &s.runtime.config;
    let prompt = |first: u32| -> Vec<u32> { (first..first + 6).collect() };
    let mut probe = KvCache::new(cfg, 6);
    feed(&s, &mut probe, &prompt(1), None);
    let entry = 6 * probe.bytes_per_token();
    // Room for two six-token prompts.
    let mut prefixes = PrefixCache::new(2 * entry);
    let cached = |p: &[u32]| {
        let mut c = KvCache::new(cfg, 6);
        feed(&s, &mut c, p, None);
        c
    };
    let (a, b, c) = (prompt(1), prompt(20), prompt(40));
    prefixes.store(&a, None, &cached(&a));
    prefixes.store(&b, None, &cached(&b));
    assert_eq!((prefixes.len(), prefixes.bytes()), (2, 2 * entry));
    // Touch a, so b is the least recently used when c arrives.
    assert_eq!(prefixes.reusable(&a, None), 5);
    let mut scratch = KvCache::new(cfg, 6);
    assert_eq!(prefixes.restore(&a, None, &mut scratch), 5);
    prefixes.store(&c, None, &cached(&c));
    assert_eq!((prefixes.len(), prefixes.bytes()), (2, 2 * entry));
    assert_eq!(prefixes.reusable(&b, None), 0, "the least recently used entry went first");
    assert_eq!(prefixes.reusable(&a, None), 5);
    assert_eq!(prefixes.reusable(&c, None), 5);
    // A longer sequence replaces the entry it extends rather than adding beside it.
    let mut grown = KvCache::new(cfg, 8);
    feed(&s, &mut grown, &c, None);
    feed(&s, &mut grown, &[50, 51], None);
    let c_long: Vec<u32> = c.iter().copied().chain([50, 51]).collect();
    let mut roomy = PrefixCache::new(64 << 20);
    roomy.store(&c, None, &cached(&c));
    roomy.store(&c_long, None, &grown);
    assert_eq!((roomy.len(), roomy.bytes()), (1, 8 * probe.bytes_per_token()));
    // A sequence bigger than half the budget is not kept.
    let mut tight = PrefixCache::new(entry);
    tight.store(&a, None, &cached(&a));
    assert!(tight.is_empty());
    // Entries of an adapter no one holds any more go at the next store.
    let one = Arc::new(s.one.clone());
    let mut under = KvCache::new(cfg, 6);
    feed(&s, &mut under, &b, Some(&*one));
    roomy.store(&b, Some(&one), &under);
    assert_eq!(roomy.len(), 2);
    drop(one);
    roomy.store(&a, None, &cached(&a));
    assert_eq!(roomy.len(), 2, "the dropped adapter's entry is gone, a is in");
    assert_eq!(roomy.reusable(&b, None), 0);
}
