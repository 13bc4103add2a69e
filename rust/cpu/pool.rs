//! A persistent pool of worker threads, pinned one per allowed CPU (round robin). A job is a
//! closure called once per shard index `0..threads`: shard 0 on the calling thread (one shard
//! starts at once, whatever the wake-up latency of the others), shard k on worker k. The
//! caller returns when every shard is done. Callers are serialised, so steps from several
//! threads queue rather than oversubscribe.

use super::topology;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

type JobFn = dyn Fn(usize) + Sync;

struct State {
    generation: u64,
    /// The current job as the two words of a fat pointer; valid while `remaining > 0` (the
    /// caller of `run` keeps the closure alive that long).
    job: Option<(usize, usize)>,
    remaining: usize,
    panic: Option<String>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    done: Condvar,
}

pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    handles: Vec<std::thread::JoinHandle<()>>,
    /// One job at a time.
    dispatch: Mutex<()>,
}

fn fat_to_words<'a>(f: &'a (dyn Fn(usize) + Sync + 'a)) -> (usize, usize) {
    // SAFETY: a trait-object pointer is two words; words_to_fat is the only reader.
    unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + 'a), (usize, usize)>(f) }
}

fn words_to_fat(w: (usize, usize)) -> *const JobFn {
    // SAFETY: inverse of fat_to_words.
    unsafe { std::mem::transmute::<(usize, usize), *const JobFn>(w) }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    /// A pool of `threads` shards (at least one): the caller plus `threads - 1` workers,
    /// worker k pinned to the k-th allowed CPU (round robin).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State { generation: 0, job: None, remaining: 0, panic: None, shutdown: false }),
            work: Condvar::new(),
            done: Condvar::new(),
        });
        let cpus = topology::allowed_cpus();
        let handles = (1..threads)
            .map(|index| {
                let shared = Arc::clone(&shared);
                let cpu = (!cpus.is_empty()).then(|| cpus[index % cpus.len()]);
                std::thread::Builder::new()
                    .name(format!("horizon-adam-{index}"))
                    .spawn(move || worker(shared, index, cpu))
                    .expect("spawning an Adam worker thread")
            })
            .collect();
        Pool { shared, threads, handles, dispatch: Mutex::new(()) }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f(k)` for every `k` in `0..threads()`, `f(0)` on the calling thread and each
    /// other on its own worker, and returns when all are done. A panic in a shard is re-raised
    /// here after the others finish.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 {
            f(0);
            return;
        }
        let _one = lock(&self.dispatch);
        {
            let mut st = lock(&self.shared.state);
            st.generation += 1;
            st.job = Some(fat_to_words(f));
            st.remaining = self.threads - 1;
            st.panic = None;
        }
        self.shared.work.notify_all();
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
        let mut st = lock(&self.shared.state);
        while st.remaining > 0 {
            st = self.shared.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.job = None;
        let theirs = st.panic.take();
        drop(st);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if let Some(msg) = theirs {
            panic!("{msg}");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.work.notify_all();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn worker(shared: Arc<Shared>, index: usize, cpu: Option<usize>) {
    if let Some(c) = cpu {
        // SAFETY: cpu_set_t is plain data; failure only loses the pinning.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(c, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    let mut seen = 0u64;
    loop {
        let mut st = lock(&shared.state);
        while st.generation == seen && !st.shutdown {
            st = shared.work.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.shutdown {
            return;
        }
        seen = st.generation;
        let job = st.job.expect("a job is set while shards remain");
        drop(st);
        // SAFETY: run() keeps the closure alive until remaining reaches 0, which cannot happen
        // before this shard reports below.
        let f = unsafe { &*words_to_fat(job) };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(index)));
        let mut st = lock(&shared.state);
        if let Err(payload) = r {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            st.panic = Some(format!("Adam worker {index}: {msg}"));
        }
        st.remaining -= 1;
        if st.remaining == 0 {
            shared.done.notify_all();
        }
    }
}

/// Shard boundaries are multiples of this many elements: whole AVX-512 vectors, and whole
/// 128-byte line pairs of a bf16 output, so no two threads write the same cache line.
pub const SHARD_ALIGN: usize = 64;

/// Below this many elements a pass runs on the calling thread: waking workers costs more.
pub const PARALLEL_MIN: usize = 1 << 15;

/// The pool a pass over `n` elements uses by default: none (the calling thread) when small.
pub fn pool_for(n: usize) -> Option<&'static Pool> {
    (n >= PARALLEL_MIN).then(global)
}

/// Threads a step uses by default: `HORIZON_ADAM_THREADS`, else one per allowed CPU.
pub fn default_threads() -> usize {
    std::env::var("HORIZON_ADAM_THREADS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n >= 1)
        .unwrap_or_else(|| topology::allowed_cpus().len().max(1))
}

/// The process-wide pool, created on first use with `default_threads()` workers.
pub fn global() -> &'static Pool {
    static P: OnceLock<Pool> = OnceLock::new();
    P.get_or_init(|| Pool::new(default_threads()))
}

/// `[start, end)` of shard `k` of `n` elements over `shards` shards; boundaries are multiples
/// of `align` elements, so every vector path sees the same whole vectors.
pub fn shard(n: usize, shards: usize, k: usize, align: usize) -> (usize, usize) {
    let per = n.div_ceil(shards.max(1)).div_ceil(align.max(1)) * align.max(1);
    ((k * per).min(n), ((k + 1) * per).min(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_shard_runs_once_and_ranges_tile() {
        for threads in 1..=4 {
            let pool = Pool::new(threads);
            let hits: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..3 {
                pool.run(&|k| {
                    hits[k].fetch_add(1, Ordering::SeqCst);
                });
            }
            assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 3));
            for n in [0usize, 1, 63, 64, 1000, 4097] {
                let mut covered = 0;
                for k in 0..threads {
                    let (s, e) = shard(n, threads, k, 64);
                    assert_eq!(s, covered);
                    assert!(s % 64 == 0 || s == n);
                    covered = e;
                }
                assert_eq!(covered, n);
            }
        }
    }

    #[test]
    fn a_worker_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = Pool::new(3);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.run(&|k| assert!(k != 2, "shard two fails"))));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(&|_| {
            n.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }
}
