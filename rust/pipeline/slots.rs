//! `SlotRing`: the free list of a fixed set of buffer slots (weight slots, landing slots).
//! Producers pop a free slot and consumers push it back from any thread, without locks.

use crossbeam_queue::ArrayQueue;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

pub struct SlotRing {
    free: ArrayQueue<usize>,
    n: usize,
    /// Parks a thread that waits for a free slot; the fast paths never touch it.
    waiters: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

impl SlotRing {
    pub fn new(n: usize) -> Self {
        let free = ArrayQueue::new(n.max(1));
        for i in 0..n {
            free.push(i).expect("ring sized to n");
        }
        SlotRing { free, n, waiters: AtomicUsize::new(0), park: Mutex::new(()), wake: Condvar::new() }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn try_acquire(&self) -> Option<usize> {
        self.free.pop()
    }

    /// Waits up to `timeout` for a free slot.
    pub fn acquire(&self, timeout: Duration) -> Option<usize> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        let deadline = std::time::Instant::now() + timeout;
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.park.lock().unwrap_or_else(|p| p.into_inner());
        let result = loop {
            if let Some(s) = self.free.pop() {
                break Some(s);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                break None;
            }
            // Short waits: a release racing with our check is picked up on the next round.
            let (g, _) = self
                .wake
                .wait_timeout(guard, (deadline - now).min(Duration::from_millis(5)))
                .unwrap_or_else(|p| p.into_inner());
            guard = g;
        };
        drop(guard);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// Returns slot `i` to the free list. Errors on an index out of range or a double release.
    pub fn release(&self, i: usize) -> Result<(), String> {
        if i >= self.n {
            return Err(format!("slot {i} out of range (ring of {})", self.n));
        }
        if self.free.len() >= self.n {
            return Err(format!("slot {i} released twice"));
        }
        self.free.push(i).map_err(|_| format!("slot {i} released twice"))?;
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.park.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn hands_out_each_slot_once() {
        let r = SlotRing::new(3);
        let mut got: Vec<_> = (0..3).map(|_| r.try_acquire().unwrap()).collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2]);
        assert!(r.try_acquire().is_none());
        r.release(1).unwrap();
        assert_eq!(r.try_acquire(), Some(1));
        assert!(r.release(7).is_err());
    }

    #[test]
    fn a_waiter_gets_a_slot_released_by_another_thread() {
        let r = Arc::new(SlotRing::new(1));
        let s = r.try_acquire().unwrap();
        let r2 = r.clone();
        let h = std::thread::spawn(move || r2.acquire(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(20));
        r.release(s).unwrap();
        assert_eq!(h.join().unwrap(), Some(s));
    }

    #[test]
    fn many_threads_never_share_a_slot() {
        let r = Arc::new(SlotRing::new(4));
        let in_use: Arc<Vec<AtomicUsize>> = Arc::new((0..4).map(|_| AtomicUsize::new(0)).collect());
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let (r, u) = (r.clone(), in_use.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let s = r.acquire(Duration::from_secs(5)).unwrap();
                        assert_eq!(u[s].fetch_add(1, Ordering::SeqCst), 0, "slot shared");
                        u[s].fetch_sub(1, Ordering::SeqCst);
                        r.release(s).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(r.free_count(), 4);
    }
}
