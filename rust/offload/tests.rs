//! The disk tier against the RAM-only AdamW (bit-identical), its I/O back ends against plain
//! files, its staging ring, and what it leaves on disk.

use super::io::{self, IoChoice, IoConfig, Op, OpKind};
use super::layout::{LayerLayout, StagingRing, ALIGN};
use super::tier::{DiskTier, Durability, GradSource, PartSrc, StepParams, TierOptions, UpdateJob};
use crate::adam::{self, AdamW};
use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let base = std::env::var_os("CARGO_TARGET_TMPDIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let p = base.join(format!("horizon-offload-{tag}-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn direct_ok(dir: &std::path::Path) -> bool {
    super::probe_direct(dir).is_ok()
}

fn backends() -> Vec<IoChoice> {
    let mut v = vec![IoChoice::Threads];
    if io::probe().0 == "io_uring" {
        v.push(IoChoice::Uring);
    } else {
        eprintln!("io_uring unavailable here: only the thread back end is tested");
    }
    v
}

fn opts(staging: usize, durability: Durability, io: IoChoice) -> TierOptions {
    TierOptions {
        staging_bytes: staging,
        durability,
        io,
        io_config: IoConfig { chunk_bytes: 64 << 10, queue_depth: 8 },
        numa_node: None,
        landing_slots: 2,
    }
}

/// xorshift values in a moderate range (so Adam's arithmetic is exercised, not saturated).
fn noise(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut x = seed.max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            ((x >> 8) as f32 / (1 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

fn hp(step: u64, grad_scale: f64) -> StepParams {
    StepParams { hyper: AdamW::new(1e-2, 0.9, 0.95, 1e-6, 0.1).unwrap(), step, grad_scale }
}

fn wait(c: &Arc<super::Completion>) {
    c.wait(Some(Duration::from_secs(60))).expect("completion within a minute").unwrap();
}

#[test]
fn staging_ring_wraps_and_reclaims_in_order() {
    let mut r = StagingRing::new(10 * ALIGN);
    let a = r.alloc(4 * ALIGN).unwrap();
    let b = r.alloc(4 * ALIGN).unwrap();
    assert_eq!((a, b), (0, 4 * ALIGN));
    assert!(r.alloc(3 * ALIGN).is_none(), "only 2 pages left at the end, none at the start");
    r.free(b); // out of order: not reclaimed before a
    assert_eq!(r.used(), 8 * ALIGN);
    assert!(r.alloc(3 * ALIGN).is_none());
    r.free(a);
    assert!(r.is_empty());
    let c = r.alloc(6 * ALIGN).unwrap();
    let d = r.alloc(4 * ALIGN).unwrap();
    assert_eq!((c, d), (0, 6 * ALIGN));
    r.free(c);
    let e = r.alloc(5 * ALIGN).unwrap(); // wraps to the start, before d
    assert_eq!(e, 0);
    assert!(r.alloc(ALIGN).is_some()); // [5, 6) pages
    assert!(r.alloc(ALIGN).is_none());
    assert!(r.alloc(11 * ALIGN).is_none());
    assert_eq!(LayerLayout::new(1, true).file_bytes(), 4 * ALIGN);
    assert_eq!(LayerLayout::new(1025, false).state_bytes(), 3 * 2 * ALIGN);
}

#[test]
fn backends_write_and_read_back_what_they_wrote() {
    let dir = TempDir::new("io");
    let direct = direct_ok(&dir.0);
    for choice in backends() {
        let path = dir.0.join(format!("f-{choice:?}"));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        let n = 3 * (64 << 10) + 2 * ALIGN; // several chunks, the last short
        let src = super::files::AlignedBuf::zeroed(n);
        let dst = super::files::AlignedBuf::zeroed(n);
        // SAFETY: inside the buffers.
        unsafe {
            for i in 0..n {
                *src.as_mut_ptr().add(i) = (i * 7 % 251) as u8;
            }
        }
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let sink: io::Sink = Arc::new(move |t, r| tx.lock().unwrap().send((t, r)).unwrap());
        let (b, note) = io::open(choice, IoConfig { chunk_bytes: 64 << 10, queue_depth: 4 }, sink).unwrap();
        if choice == IoChoice::Threads {
            assert!(note.contains("threads"), "{note}");
        }
        b.submit(&[Op { kind: OpKind::Write, fd, buf: src.as_mut_ptr() as usize, len: n, offset: 0, token: 1 }]);
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), (1, Ok(())));
        b.submit(&[Op { kind: OpKind::Sync, fd, buf: 0, len: 0, offset: 0, token: 2 }]);
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), (2, Ok(())));
        b.submit(&[Op { kind: OpKind::Read, fd, buf: dst.as_mut_ptr() as usize, len: n, offset: 0, token: 3 }]);
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), (3, Ok(())));
        // SAFETY: both buffers are n bytes.
        unsafe { assert_eq!(std::slice::from_raw_parts(src.as_mut_ptr(), n), std::slice::from_raw_parts(dst.as_mut_ptr(), n)) };
        // Reading past the end is an error naming the operation, not a hang.
        b.submit(&[Op { kind: OpKind::Read, fd, buf: dst.as_mut_ptr() as usize, len: ALIGN, offset: (n + ALIGN) as u64, token: 4 }]);
        let (t, r) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(t, 4);
        assert!(r.unwrap_err().contains("end of file"));
        drop(b);
        let _ = direct;
    }
}

/// Runs `steps` steps of AdamW on `numels`-sized layers through a tier and in RAM, with the
/// same gradients; returns nothing, asserts bit-identity of master, m, v and the bf16 copy.
fn tier_matches_ram(numels: &[usize], disk_grad: bool, durability: Durability, io: IoChoice, staging_layers: usize) {
    let dir = TempDir::new("eq");
    let direct = direct_ok(&dir.0);
    let lays: Vec<LayerLayout> = numels.iter().map(|&n| LayerLayout::new(n, disk_grad)).collect();
    let staging = lays.iter().map(|l| l.file_bytes()).max().unwrap() * staging_layers;
    let tier = DiskTier::new(&dir.0, numels, disk_grad, direct, &opts(staging, durability, io)).unwrap();
    // RAM reference state and the tier's initial state
    let mut ram: Vec<[Vec<f32>; 3]> = numels.iter().enumerate().map(|(i, &n)| [noise(n, 11 + i as u32, 2.0), vec![0.0; n], vec![0.0; n]]).collect();
    for (i, st) in ram.iter().enumerate() {
        wait(&tier.write_state(i, [PartSrc::Buf(st[0].as_ptr() as usize), PartSrc::Zero, PartSrc::Keep]).unwrap());
    }
    let mut w_tier: Vec<Vec<u16>> = numels.iter().map(|&n| vec![0; n]).collect();
    let mut w_ram: Vec<Vec<u16>> = numels.iter().map(|&n| vec![0; n]).collect();
    // landing buffers: page-aligned and padded to whole pages (direct I/O from them)
    let landing: Vec<super::files::AlignedBuf> = (0..2).map(|_| super::files::AlignedBuf::zeroed(lays.iter().map(|l| l.part_bytes).max().unwrap())).collect();
    let order: Vec<usize> = (0..numels.len()).rev().collect();
    for step in 1..=4u64 {
        let grads: Vec<Vec<f32>> = numels.iter().enumerate().map(|(i, &n)| noise(n, 1000 * step as u32 + i as u32, 0.1)).collect();
        let scale = if disk_grad { 0.37 } else { 1.0 };
        tier.begin_step(order.clone(), disk_grad).unwrap();
        let mut tickets = Vec::new();
        if disk_grad {
            // clipping schedule: all gradients land first (reverse order), then the updates are
            // queued at once, without waiting for the landings (as the engine does)
            for &l in &order {
                let slot = tier.landing().acquire(Duration::from_secs(30)).unwrap();
                let buf = landing[slot].as_mut_ptr() as usize;
                let t = tier.land(l, buf, grads[l].as_ptr() as usize, None, Some(slot)).unwrap();
                tickets.push(t);
            }
        }
        for &l in &order {
            let grad = if disk_grad {
                GradSource::Disk
            } else {
                let slot = tier.landing().acquire(Duration::from_secs(30)).unwrap();
                GradSource::Landing { ptr: landing[slot].as_mut_ptr() as usize, copy_from: grads[l].as_ptr() as usize, cuda_event: None, slot: Some(slot) }
            };
            let job = UpdateJob { layer: l, grad, hp: hp(step, scale), skip_nonfinite: false, w_bf16: w_tier[l].as_mut_ptr() as usize, p_copy: 0 };
            let (a, d) = tier.update(job).unwrap();
            tickets.push(a);
            tickets.push(d);
        }
        for t in &tickets {
            wait(t);
        }
        for (l, st) in ram.iter_mut().enumerate() {
            let [p, m, v] = st;
            let h = hp(step, scale);
            adam::adamw_step(p, &grads[l], m, v, Some(&mut w_ram[l]), &h.hyper, h.step, h.grad_scale);
        }
        for l in 0..numels.len() {
            assert_eq!(w_tier[l], w_ram[l], "bf16 copy of layer {l} after step {step}");
        }
    }
    wait(&tier.flush());
    for (l, st) in ram.iter().enumerate() {
        let n = numels[l];
        let got: Vec<Vec<f32>> = (0..3).map(|_| vec![0f32; n]).collect();
        wait(&tier.read_state(l, [got[0].as_ptr() as usize, got[1].as_ptr() as usize, got[2].as_ptr() as usize]).unwrap());
        for k in 0..3 {
            let same = got[k].iter().zip(&st[k]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "layer {l} part {k} differs from the RAM run");
        }
    }
    let s = tier.stats();
    assert_eq!(s.updates, 4 * numels.len() as u64);
    let state: u64 = lays.iter().map(|l| l.state_bytes() as u64).sum();
    let grad: u64 = if disk_grad { lays.iter().map(|l| l.part_bytes as u64).sum() } else { 0 };
    // per step: the state read and written once, the gradient written and read once
    assert!(s.bytes_read >= 4 * (state + grad), "{s:?}");
    assert!(s.syncs > 0);
    // Busy time per direction: some of each, never more than the time with anything in flight
    // (up to the clock reads' own nanoseconds).
    assert!(s.read_busy_seconds > 0.0 && s.write_busy_seconds > 0.0, "{s:?}");
    assert!(s.read_busy_seconds.max(s.write_busy_seconds) <= s.io_busy_seconds + 1e-3, "{s:?}");
    assert!(s.staging_peak_bytes as usize <= staging);
    let files = tier.layer_path(0);
    assert!(files.exists());
    drop(tier);
    assert!(!files.exists(), "the tier's files outlive it");
    assert!(!dir.0.join(super::files::LOCK).exists());
}

#[test]
fn updates_through_the_tier_equal_the_ram_adamw_bit_for_bit() {
    let numels = [1000usize, 70_000, 5, 40_000];
    for io in backends() {
        tier_matches_ram(&numels, false, Durability::Layer, io, 2);
        tier_matches_ram(&numels, true, Durability::Step, io, 2);
    }
    // the least staging: one layer at a time
    tier_matches_ram(&numels, true, Durability::Layer, IoChoice::Auto, 1);
    tier_matches_ram(&numels, false, Durability::Step, IoChoice::Auto, 1);
}

#[test]
fn a_nonfinite_gradient_leaves_the_layer_untouched_and_a_cancel_frees_the_read_ahead() {
    let dir = TempDir::new("skip");
    let n = 4096;
    let tier = DiskTier::new(&dir.0, &[n, n], false, direct_ok(&dir.0), &opts(3 * 4 * n * 3, Durability::Layer, IoChoice::Auto)).unwrap();
    let p0 = noise(n, 5, 1.0);
    wait(&tier.write_state(0, [PartSrc::Buf(p0.as_ptr() as usize), PartSrc::Zero, PartSrc::Zero]).unwrap());
    wait(&tier.write_state(1, [PartSrc::Buf(p0.as_ptr() as usize), PartSrc::Zero, PartSrc::Zero]).unwrap());
    // a step that is abandoned after its read-ahead started (a non-finite loss)
    tier.begin_step(vec![1, 0], false).unwrap();
    tier.cancel();
    let mut g = noise(n, 6, 0.1);
    g[17] = f32::NAN;
    let landing = super::files::AlignedBuf::zeroed(n * 4);
    tier.begin_step(vec![1, 0], false).unwrap();
    let slot = tier.landing().acquire(Duration::from_secs(5)).unwrap();
    let (a, d) = tier
        .update(UpdateJob { layer: 1, grad: GradSource::Landing { ptr: landing.as_mut_ptr() as usize, copy_from: g.as_ptr() as usize, cuda_event: None, slot: Some(slot) }, hp: hp(1, 1.0), skip_nonfinite: true, w_bf16: 0, p_copy: 0 })
        .unwrap();
    wait(&a);
    wait(&d);
    assert_eq!(tier.stats().skipped_updates, 1);
    assert_eq!(tier.landing().free_count(), 2, "the landing slot is returned after a skip");
    wait(&tier.flush());
    let got = vec![0f32; n];
    wait(&tier.read_state(1, [got.as_ptr() as usize, 0, 0]).unwrap());
    assert!(got.iter().zip(&p0).all(|(a, b)| a.to_bits() == b.to_bits()));
    // layer 0's read-ahead was never consumed: the misc read above cancelled it, nothing hangs
    assert_eq!(tier.stats().updates, 0);
}

#[test]
fn a_second_tier_in_the_same_dir_is_refused_and_a_missing_dir_named() {
    let dir = TempDir::new("lock");
    let o = opts(1 << 20, Durability::Layer, IoChoice::Threads);
    let t = DiskTier::new(&dir.0, &[100], false, false, &o).unwrap();
    let e = DiskTier::new(&dir.0, &[100], false, false, &o).err().unwrap();
    assert!(e.contains("in use by another run"), "{e}");
    drop(t);
    // after the first is gone, the directory is free again
    drop(DiskTier::new(&dir.0, &[100], false, false, &o).unwrap());
    let missing = dir.0.join("nope");
    let e = DiskTier::new(&missing, &[100], false, false, &o).err().unwrap();
    assert!(e.contains("nope"), "{e}");
    let e = DiskTier::new(&dir.0, &[1 << 20], false, false, &o).err().unwrap();
    assert!(e.contains("staging budget"), "{e}");
    // nothing left behind by the refusals
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
}

#[test]
fn a_dead_runs_files_are_replaced() {
    let dir = TempDir::new("stale");
    let sub = dir.0.join(super::files::SUBDIR);
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(sub.join("layer-00000.state"), b"junk from a killed run").unwrap();
    std::fs::write(dir.0.join(super::files::LOCK), b"").unwrap();
    let o = opts(1 << 20, Durability::Step, IoChoice::Auto);
    let t = DiskTier::new(&dir.0, &[10_000], false, direct_ok(&dir.0), &o).unwrap();
    let got = vec![1f32; 10_000];
    wait(&t.read_state(0, [got.as_ptr() as usize, got.as_ptr() as usize, 0]).unwrap());
    assert!(got.iter().all(|&x| x == 0.0), "a fresh file reads as zeros");
    let meta = std::fs::metadata(t.layer_path(0)).unwrap();
    assert_eq!(meta.len() as usize, LayerLayout::new(10_000, false).file_bytes());
}

#[test]
fn the_roof_measures_both_directions() {
    let dir = TempDir::new("roof");
    let r = super::roof::measure(&dir.0, 8 << 20, IoConfig { chunk_bytes: 256 << 10, queue_depth: 4 }, IoChoice::Auto, direct_ok(&dir.0)).unwrap();
    assert!(r.read_gbps > 0.0 && r.write_gbps > 0.0 && r.first_write_gbps > 0.0 && r.mixed_gbps > 0.0, "{r:?}");
    assert!(r.bytes >= 8 << 20);
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0, "the scratch file is removed");
    // over existing files: each read and overwritten whole
    let files: Vec<PathBuf> = (0..3).map(|i| dir.0.join(format!("f{i}"))).collect();
    for (i, f) in files.iter().enumerate() {
        std::fs::write(f, vec![1u8; (i + 1) * 3 * ALIGN]).unwrap();
    }
    let r = super::roof::measure_files(&files, IoConfig { chunk_bytes: ALIGN, queue_depth: 4 }, IoChoice::Auto, direct_ok(&dir.0)).unwrap();
    assert_eq!(r.bytes as usize, 18 * ALIGN);
    assert!(r.mixed_gbps > 0.0);
    assert_eq!(std::fs::metadata(&files[2]).unwrap().len() as usize, 9 * ALIGN, "sizes are kept");
}

#[test]
fn a_flush_completes_only_after_every_write_before_it() {
    // A step's updates queued and nothing waited (their write-backs in flight when the flush is
    // asked for): once the flush reports done, every update is done and the files hold the
    // updated state, byte for byte the RAM AdamW's.
    for io in backends() {
        let dir = TempDir::new("flush");
        let numels = [3 << 20, 2 << 20, 3 << 20];
        let lays: Vec<LayerLayout> = numels.iter().map(|&n| LayerLayout::new(n, false)).collect();
        let staging = lays.iter().map(|l| l.file_bytes()).max().unwrap() * 2;
        let tier = DiskTier::new(&dir.0, &numels, false, direct_ok(&dir.0), &opts(staging, Durability::Step, io)).unwrap();
        let mut ram: Vec<[Vec<f32>; 3]> =
            numels.iter().enumerate().map(|(i, &n)| [noise(n, 77 + i as u32, 2.0), vec![0.0; n], vec![0.0; n]]).collect();
        for (i, st) in ram.iter().enumerate() {
            wait(&tier.write_state(i, [PartSrc::Buf(st[0].as_ptr() as usize), PartSrc::Zero, PartSrc::Zero]).unwrap());
        }
        let grads: Vec<Vec<f32>> = numels.iter().enumerate().map(|(i, &n)| noise(n, 500 + i as u32, 0.1)).collect();
        let landing: Vec<super::files::AlignedBuf> =
            (0..2).map(|_| super::files::AlignedBuf::zeroed(lays.iter().map(|l| l.part_bytes).max().unwrap())).collect();
        let mut w: Vec<Vec<u16>> = numels.iter().map(|&n| vec![0; n]).collect();
        let order: Vec<usize> = (0..numels.len()).rev().collect();
        tier.begin_step(order.clone(), false).unwrap();
        let mut tickets = Vec::new();
        for &l in &order {
            let slot = tier.landing().acquire(Duration::from_secs(30)).unwrap();
            let grad = GradSource::Landing {
                ptr: landing[slot].as_mut_ptr() as usize, copy_from: grads[l].as_ptr() as usize, cuda_event: None, slot: Some(slot),
            };
            let job = UpdateJob { layer: l, grad, hp: hp(1, 1.0), skip_nonfinite: false, w_bf16: w[l].as_mut_ptr() as usize, p_copy: 0 };
            let (a, d) = tier.update(job).unwrap();
            tickets.push(a);
            tickets.push(d);
        }
        wait(&tier.flush());
        assert!(tickets.iter().all(|t| t.is_done()), "{io:?}: an update still running after the flush");
        for (l, st) in ram.iter_mut().enumerate() {
            let [p, m, v] = st;
            let h = hp(1, 1.0);
            adam::adamw_step(p, &grads[l], m, v, None, &h.hyper, h.step, h.grad_scale);
            let bytes = std::fs::read(tier.layer_path(l)).unwrap();
            for (k, part) in st.iter().enumerate() {
                let at = k * lays[l].part_bytes;
                let want: Vec<u8> = part.iter().flat_map(|x| x.to_le_bytes()).collect();
                assert!(bytes[at..at + want.len()] == want[..], "{io:?}: layer {l} part {k} is not on disk after the flush");
            }
        }
        drop(w);
    }
}
