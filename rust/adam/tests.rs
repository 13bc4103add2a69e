//! AdamW against an f64 reference, bit-identity across SIMD paths and thread counts, the bf16
//! rounding against the `half` crate, the reductions, and (feature `roof`) the bandwidth roof.

use super::*;
use crate::cpu::bf16::bf16_rne;
use crate::cpu::pool::PARALLEL_MIN;
use crate::cpu::simd::supported_levels;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Roughly normal: sum of uniforms, centred.
    fn normal(&mut self) -> f32 {
        let mut s = 0.0f64;
        for _ in 0..4 {
            s += (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        }
        ((s - 2.0) * 1.7) as f32
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

#[derive(Clone)]
struct State {
    p: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    w: Vec<u16>,
}

fn state(n: usize, seed: u64) -> State {
    let mut r = Rng(seed);
    State { p: r.vec(n, 1.0), m: r.vec(n, 0.01), v: r.vec(n, 0.01).iter().map(|x| x * x).collect(), w: vec![0; n] }
}

const SIZES: [usize; 9] = [0, 1, 7, 15, 16, 17, 63, 1000, 70_001];

#[test]
fn matches_an_f64_reference_over_steps() {
    let n = 1037;
    let mut s = state(n, 7);
    let mut r = Rng(99);
    let (mut p64, mut m64, mut v64): (Vec<f64>, Vec<f64>, Vec<f64>) = (
        s.p.iter().map(|&x| x as f64).collect(),
        s.m.iter().map(|&x| x as f64).collect(),
        s.v.iter().map(|&x| x as f64).collect(),
    );
    for step in 1..=10u64 {
        let g = r.vec(n, 0.5);
        let hp = AdamW::new(1e-2, 0.9, 0.99, 1e-8, 0.1).unwrap();
        adamw_step(&mut s.p, &g, &mut s.m, &mut s.v, Some(&mut s.w), &hp, step, 0.75);
        let (b1, b2, lr) = (0.9f64, 0.99f64, 1e-2f64);
        for i in 0..n {
            let gs = g[i] as f64 * 0.75;
            p64[i] *= 1.0 - lr * 0.1;
            m64[i] = b1 * m64[i] + (1.0 - b1) * gs;
            v64[i] = b2 * v64[i] + (1.0 - b2) * gs * gs;
            let bc1 = 1.0 - b1.powi(step as i32);
            let bc2 = 1.0 - b2.powi(step as i32);
            p64[i] -= lr / bc1 * m64[i] / (v64[i].sqrt() / bc2.sqrt() + 1e-8);
        }
    }
    for i in 0..n {
        let tol = 1e-5 * p64[i].abs().max(1e-2);
        assert!((s.p[i] as f64 - p64[i]).abs() <= tol, "p[{i}] = {} vs reference {}", s.p[i], p64[i]);
        assert!((s.m[i] as f64 - m64[i]).abs() <= 1e-5 * m64[i].abs().max(1e-2), "m[{i}]");
        assert!((s.v[i] as f64 - v64[i]).abs() <= 1e-5 * v64[i].abs().max(1e-4), "v[{i}]");
        assert_eq!(s.w[i], half::bf16::from_f32(s.p[i]).to_bits());
    }
}

/// The calling thread alone, then pools of 1, 2 and 3 workers.
fn pools(owned: &[Pool]) -> Vec<Option<&Pool>> {
    std::iter::once(None).chain(owned.iter().map(Some)).collect()
}

#[test]
fn bit_identical_across_paths_and_thread_counts() {
    let owned: Vec<Pool> = (1..=3).map(Pool::new).collect();
    for &n in &SIZES {
        let init = state(n, 3 + n as u64);
        let g = Rng(5).vec(n, 1.0);
        let hp = AdamW::default();
        let mut reference: Option<State> = None;
        for level in supported_levels() {
            for pool in pools(&owned) {
                let mut s = init.clone();
                adamw_step_with(level, pool, &mut s.p, &g, &mut s.m, &mut s.v, Some(&mut s.w), &hp, 3, 0.5);
                match &reference {
                    None => reference = Some(s),
                    Some(r) => {
                        let what = format!("n={n} level={} threads={:?}", level.name(), pool.map(|p| p.threads()));
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&s.p), bits(&r.p), "p differs: {what}");
                        assert_eq!(bits(&s.m), bits(&r.m), "m differs: {what}");
                        assert_eq!(bits(&s.v), bits(&r.v), "v differs: {what}");
                        assert_eq!(s.w, r.w, "bf16 copy differs: {what}");
                    }
                }
            }
        }
    }
}

#[test]
fn without_a_bf16_copy_the_update_is_the_same() {
    let n = 333;
    let g = Rng(1).vec(n, 1.0);
    let hp = AdamW::default();
    let mut a = state(n, 2);
    let mut b = a.clone();
    adamw_step(&mut a.p, &g, &mut a.m, &mut a.v, Some(&mut a.w), &hp, 1, 1.0);
    adamw_step(&mut b.p, &g, &mut b.m, &mut b.v, None, &hp, 1, 1.0);
    assert_eq!(a.p, b.p);
    assert!(b.w.iter().all(|&x| x == 0));
}

#[test]
fn bf16_rounding_matches_half_on_every_path() {
    let mut r = Rng(11);
    let mut specials: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001), // signalling NaN: must come out quiet
        f32::from_bits(0x0000_0001), // denormals
        f32::from_bits(0x8000_8000),
        f32::from_bits(0x3F80_8000), // exact ties: to even (down)
        f32::from_bits(0x3F81_8000), // to even (up)
        f32::from_bits(0x7F7F_FFFF), // rounds to inf
        f32::MAX,
        f32::MIN_POSITIVE,
    ];
    specials.extend((0..5000).map(|_| f32::from_bits(r.next() as u32)));
    for &x in &specials {
        let want = half::bf16::from_f32(x).to_bits();
        let got = bf16_rne(x);
        if x.is_nan() {
            assert!(half::bf16::from_bits(got).is_nan(), "NaN {x:?} rounded to a non-NaN {got:#x}");
            assert_eq!(got & 0x40, 0x40, "NaN must be quiet");
            assert_eq!(got & 0x8000, (x.to_bits() >> 16) as u16 & 0x8000, "NaN sign kept");
        } else {
            assert_eq!(got, want, "bf16 of {x:e} ({:#x})", x.to_bits());
        }
    }
    // The vector paths write the copy from p'; zero moments, zero gradient, no decay and a
    // step whose update is exactly 0 leave p' = p, so the copy is the rounding of the inputs.
    let n = specials.len();
    let hp = AdamW::new(0.0, 0.9, 0.999, 1e-8, 0.0).unwrap();
    for level in supported_levels() {
        let mut p = specials.clone();
        let (g, mut m, mut v, mut w) = (vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![0u16; n]);
        adamw_step_with(level, None, &mut p, &g, &mut m, &mut v, Some(&mut w), &hp, 1, 1.0);
        for i in 0..n {
            if specials[i].is_nan() {
                assert!(half::bf16::from_bits(w[i]).is_nan());
            } else {
                assert_eq!(w[i], bf16_rne(p[i]), "level {} element {i}", level.name());
                assert_eq!(p[i].to_bits(), specials[i].to_bits(), "lr 0 must leave p unchanged");
            }
        }
    }
}

#[test]
fn squared_norm_is_exact_enough_and_deterministic() {
    let owned: Vec<Pool> = (1..=3).map(Pool::new).collect();
    for n in [0usize, 1, 17, reduce::CHUNK - 1, reduce::CHUNK + 5, 3 * reduce::CHUNK + 100] {
        let g = Rng(n as u64 + 1).vec(n, 3.0);
        let exact: f64 = g.iter().map(|&x| (x as f64) * (x as f64)).sum();
        let mut first: Option<u64> = None;
        for level in supported_levels() {
            for pool in pools(&owned) {
                let s = grad_sq_norm_with(level, pool, &g);
                assert!((s - exact).abs() <= 1e-12 * exact.max(1e-300), "n={n}: {s} vs {exact}");
                match first {
                    None => first = Some(s.to_bits()),
                    Some(b) => assert_eq!(s.to_bits(), b, "n={n} level={} differs", level.name()),
                }
            }
        }
        assert_eq!(grad_sq_norm(&g).to_bits(), first.unwrap());
    }
}

#[test]
fn finite_check_finds_a_bad_value_anywhere() {
    let owned: Vec<Pool> = (1..=3).map(Pool::new).collect();
    let n = 2 * PARALLEL_MIN + 13;
    let clean = Rng(4).vec(n, 1.0);
    for level in supported_levels() {
        for pool in pools(&owned) {
            assert!(all_finite_with(level, pool, &clean));
            assert!(all_finite_with(level, pool, &[]));
            for &at in &[0usize, 15, 16, n / 2, n - 1] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut g = clean.clone();
                    g[at] = bad;
                    assert!(!all_finite_with(level, pool, &g), "missed {bad} at {at}");
                }
            }
        }
    }
    assert!(all_finite(&[f32::MAX, -f32::MAX, f32::MIN_POSITIVE]));
}

#[test]
#[should_panic(expected = "lengths differ")]
fn mismatched_lengths_panic() {
    let (mut p, g, mut m, mut v) = (vec![0f32; 4], vec![0f32; 3], vec![0f32; 4], vec![0f32; 4]);
    adamw_step(&mut p, &g, &mut m, &mut v, None, &AdamW::default(), 1, 1.0);
}

#[cfg(feature = "roof")]
#[test]
fn memory_roof_touches_every_element() {
    let n = 1001;
    let (mut p, g, mut m, mut v, mut w) = (vec![1f32; n], vec![2f32; n], vec![3f32; n], vec![4f32; n], vec![0u16; n]);
    let pool = Pool::new(2);
    roof::memory_roof_pass(Some(&pool), &mut p, &g, &mut m, &mut v, Some(&mut w));
    let x = |a: f32| f32::from_bits(a.to_bits() ^ 2f32.to_bits());
    assert!(p.iter().all(|&e| e == x(1.0)) && m.iter().all(|&e| e == x(3.0)) && v.iter().all(|&e| e == x(4.0)));
    assert!(w.iter().all(|&e| e == (x(1.0).to_bits() >> 16) as u16));
}

#[test]
fn constants_are_derived_in_f64_like_torch() {
    // torch computes 1 - beta2 from the Python float; so must we
    let c = kernels::Consts::new(&AdamW::new(1e-3, 0.9, 0.999, 1e-8, 1e-2).unwrap(), 1, 1.0);
    assert_eq!(c.omb2, (1.0f64 - 0.999) as f32);
}

#[test]
fn streamed_bf16_copy_is_identical_at_any_alignment() {
    // Large enough for streaming stores; the copy starts 0..3 elements past an aligned base so
    // the aligned head differs, on every path and thread count.
    let owned: Vec<Pool> = (1..=3).map(Pool::new).collect();
    let n = STREAM_MIN + 77;
    let init = state(n, 21);
    let g = Rng(22).vec(n, 1.0);
    let hp = AdamW::default();
    let mut want = init.clone();
    adamw_step_with(SimdLevel::Scalar, None, &mut want.p, &g, &mut want.m, &mut want.v, Some(&mut want.w), &hp, 2, 1.0);
    for skew in 0..4usize {
        for level in supported_levels() {
            for pool in pools(&owned) {
                let mut s = init.clone();
                let mut wbuf = vec![0u16; n + skew];
                let w = &mut wbuf[skew..];
                adamw_step_with(level, pool, &mut s.p, &g, &mut s.m, &mut s.v, Some(w), &hp, 2, 1.0);
                assert!(wbuf[skew..] == want.w[..], "bf16 copy differs: skew {skew} level {}", level.name());
                assert!(s.p.iter().zip(&want.p).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
}

#[cfg(feature = "roof")]
#[test]
fn memory_roof_streams_the_copy_at_an_unaligned_start() {
    // (The roof half of streamed_bf16_copy_is_identical_at_any_alignment, same buffers.)
    let owned: Vec<Pool> = (1..=3).map(Pool::new).collect();
    let n = STREAM_MIN + 77;
    let init = state(n, 21);
    let g = Rng(22).vec(n, 1.0);
    let mut r = init.clone();
    let mut wbuf = vec![0u16; n + 1];
    roof::memory_roof_pass(Some(&owned[1]), &mut r.p, &g, &mut r.m, &mut r.v, Some(&mut wbuf[1..]));
    assert!(r.p.iter().zip(&init.p).zip(&g).all(|((a, b), gg)| a.to_bits() == b.to_bits() ^ gg.to_bits()));
    assert!(wbuf[1..].iter().zip(&r.p).all(|(w, p)| *w == (p.to_bits() >> 16) as u16));
}

#[test]
fn sharded_work_covers_every_element_once_even_with_a_straggler() {
    use std::sync::atomic::{AtomicU8, Ordering};
    for threads in 2..=3 {
        let pool = Pool::new(threads);
        let n = 10 * CHUNK + 123;
        let hits: Vec<AtomicU8> = (0..n).map(|_| AtomicU8::new(0)).collect();
        let first = std::sync::atomic::AtomicBool::new(true);
        sharded(&pool, n, SHARD_ALIGN, CHUNK, &|s, e| {
            // The first chunk taken stalls, so the others must take over its shard's rest.
            if first.swap(false, Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            assert!(s % SHARD_ALIGN == 0 && s < e && e <= n);
            for h in &hits[s..e] {
                h.fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "threads {threads}");
    }
}

#[test]
fn hyper_parameters_follow_one_rule_each() {
    let ok = AdamW::new(0.0, 0.0, 0.0, f64::MIN_POSITIVE, 0.0).unwrap();
    assert_eq!((ok.lr(), ok.beta1(), ok.beta2(), ok.eps(), ok.weight_decay()), (0.0, 0.0, 0.0, f64::MIN_POSITIVE, 0.0));
    let almost_one = 1.0 - f64::EPSILON / 2.0;
    assert!(AdamW::new(1e3, almost_one, almost_one, 1.0, 1e3).is_ok());
    let cases: [(f64, f64, f64, f64, f64, Field, f64); 10] = [
        (-1e-9, 0.9, 0.999, 1e-8, 0.0, Field::Lr, -1e-9),
        (f64::NAN, 0.9, 0.999, 1e-8, 0.0, Field::Lr, f64::NAN),
        (f64::INFINITY, 0.9, 0.999, 1e-8, 0.0, Field::Lr, f64::INFINITY),
        (1e-3, 1.0, 0.999, 1e-8, 0.0, Field::Beta1, 1.0),
        (1e-3, -0.1, 0.999, 1e-8, 0.0, Field::Beta1, -0.1),
        (1e-3, 0.9, 1.0, 1e-8, 0.0, Field::Beta2, 1.0),
        (1e-3, 0.9, 0.999, 0.0, 0.0, Field::Eps, 0.0),
        (1e-3, 0.9, 0.999, f64::INFINITY, 0.0, Field::Eps, f64::INFINITY),
        (1e-3, 0.9, 0.999, 1e-8, -1.0, Field::WeightDecay, -1.0),
        (1e-3, 0.9, 0.999, 1e-8, f64::NAN, Field::WeightDecay, f64::NAN),
    ];
    for (lr, b1, b2, eps, wd, field, value) in cases {
        let e = AdamW::new(lr, b1, b2, eps, wd).unwrap_err();
        assert_eq!(e.field, field);
        assert_eq!(e.value.to_bits(), value.to_bits());
    }
    assert_eq!(
        AdamW::new(-0.5, 0.9, 0.999, 1e-8, 0.0).unwrap_err().to_string(),
        "lr must be a finite number >= 0, got -0.5"
    );
    assert_eq!(
        AdamW::new(1e-3, 0.9, 1.0, 1e-8, 0.0).unwrap_err().to_string(),
        "beta2 (betas[1]) must be a finite number in [0, 1), got 1.0"
    );
    // with_lr keeps the rest and checks the new rate
    let hp = AdamW::new(1e-3, 0.8, 0.95, 1e-6, 0.1).unwrap();
    assert_eq!(hp.with_lr(0.0).unwrap(), AdamW::new(0.0, 0.8, 0.95, 1e-6, 0.1).unwrap());
    assert_eq!(hp.with_lr(-1.0).unwrap_err().field, Field::Lr);
}
