//! Criterion benchmarks of the fused CPU AdamW step: each SIMD path on the global pool, with
//! and without the bf16 copy, against the bandwidth roof (the same loads and stores with no
//! arithmetic) measured in the same run. Throughput is reported in parameters per second.
//!
//! `cargo bench --features roof --bench adam` (HORIZON_ADAM_THREADS sets the pool size). The
//! roof is benchmark-only code behind the `roof` feature, which this bench requires.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use horizon_native::adam::{self, roof, AdamW};
use horizon_native::cpu::{pool, simd::supported_levels};
use std::time::Duration;

struct Buffers {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    w: Vec<u16>,
}

fn buffers(n: usize) -> Buffers {
    // Deterministic, varied, finite values; no denormals (they would slow some paths).
    let f = |i: usize, s: f32| ((i.wrapping_mul(2_654_435_761) % 1000) as f32 / 1000.0 - 0.5) * s;
    Buffers {
        p: (0..n).map(|i| f(i, 2.0)).collect(),
        g: (0..n).map(|i| f(i + 7, 1.0)).collect(),
        m: (0..n).map(|i| f(i + 3, 0.1)).collect(),
        v: (0..n).map(|i| f(i + 5, 0.1).abs() + 1e-3).collect(),
        w: vec![0; n],
    }
}

fn bench_step(c: &mut Criterion) {
    let pool = pool::global();
    for &n in &[1usize << 20, 10_000_000] {
        let mut group = c.benchmark_group(format!("adamw_{:.0}M", n as f64 / 1e6));
        group.throughput(Throughput::Elements(n as u64));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(3));
        group.warm_up_time(Duration::from_millis(500));
        let mut b = buffers(n);
        let mut step = 0u64;
        let hyper = AdamW::default();
        for level in supported_levels() {
            for bf16 in [false, true] {
                let id = BenchmarkId::new(format!("{}{}", level.name(), if bf16 { "+bf16" } else { "" }), pool.threads());
                group.bench_function(id, |bench| {
                    bench.iter(|| {
                        step += 1;
                        let w = bf16.then_some(b.w.as_mut_slice());
                        let t = step % 1000 + 1;
                        adam::adamw_step_with(level, Some(pool), &mut b.p, &b.g, &mut b.m, &mut b.v, w, &hyper, t, 1.0);
                    })
                });
            }
        }
        for bf16 in [false, true] {
            let id = BenchmarkId::new(if bf16 { "roof+bf16" } else { "roof" }, pool.threads());
            let mut r = buffers(n);
            group.bench_function(id, |bench| {
                bench.iter(|| {
                    let w = bf16.then_some(r.w.as_mut_slice());
                    roof::memory_roof_pass(Some(pool), &mut r.p, &r.g, &mut r.m, &mut r.v, w);
                })
            });
        }
        group.bench_function("grad_sq_norm", |bench| bench.iter(|| black_box(adam::grad_sq_norm(&b.g))));
        group.finish();
    }
}

criterion_group!(benches, bench_step);
criterion_main!(benches);
