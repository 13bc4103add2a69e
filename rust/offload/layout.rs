//! Where a layer's state sits in its file, and the ring of host staging memory reads land in.
//!
//! A layer file holds the parts master, exp_avg, exp_avg_sq (and, with gradient clipping, the
//! fp32 gradient of the step) back to back, each `part_bytes` long: `numel * 4` rounded up to
//! `ALIGN`. Offsets and lengths are multiples of `ALIGN`, as direct I/O wants, and the three
//! state parts form one contiguous range: a layer is read with one request and written with one.
//! A staging buffer mirrors the file's layout, so the same offsets serve both.

/// Alignment of every offset, length and buffer address of direct I/O: the largest logical
/// block size of current disks (4 KiB), and the page size.
pub const ALIGN: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerLayout {
    pub numel: usize,
    /// Bytes of one part in the file and in staging: `numel * 4` rounded up to ALIGN.
    pub part_bytes: usize,
    /// The file also holds the step's gradient (the clipping schedule).
    pub with_grad: bool,
}

/// Index of a part inside a layer file / staging buffer.
pub const MASTER: usize = 0;
pub const EXP_AVG: usize = 1;
pub const EXP_AVG_SQ: usize = 2;
pub const GRAD: usize = 3;

impl LayerLayout {
    pub fn new(numel: usize, with_grad: bool) -> LayerLayout {
        let part_bytes = (numel.max(1) * 4).next_multiple_of(ALIGN);
        LayerLayout { numel, part_bytes, with_grad }
    }

    /// Bytes of master + exp_avg + exp_avg_sq: what one step reads and writes back.
    pub fn state_bytes(&self) -> usize {
        3 * self.part_bytes
    }

    /// Bytes of the file (and of a staging buffer for this layer).
    pub fn file_bytes(&self) -> usize {
        (3 + self.with_grad as usize) * self.part_bytes
    }

    pub fn part_offset(&self, part: usize) -> usize {
        part * self.part_bytes
    }
}

/// Staging memory handed out in the order the step needs it. Blocks are allocated at the head
/// of a ring and usually freed in the same order; a block freed early is reclaimed once every
/// block before it is free. All offsets and lengths are multiples of ALIGN.
#[derive(Debug)]
pub struct StagingRing {
    cap: usize,
    /// (offset, length, freed), oldest first.
    blocks: std::collections::VecDeque<(usize, usize, bool)>,
}

impl StagingRing {
    pub fn new(cap: usize) -> StagingRing {
        StagingRing { cap: cap / ALIGN * ALIGN, blocks: Default::default() }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Bytes held by blocks not yet reclaimed.
    pub fn used(&self) -> usize {
        self.blocks.iter().map(|b| b.1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The offset of a new block of `len` bytes (rounded up to ALIGN), or None while the
    /// space is held.
    pub fn alloc(&mut self, len: usize) -> Option<usize> {
        let len = len.max(1).next_multiple_of(ALIGN);
        if len > self.cap {
            return None;
        }
        let off = match (self.blocks.front(), self.blocks.back()) {
            (Some(&(first, ..)), Some(&(last, last_len, _))) => {
                let head = last + last_len;
                if first <= last {
                    // [first .. head) is used: free space is [head, cap) then [0, first).
                    if self.cap - head >= len {
                        head
                    } else if first >= len {
                        0
                    } else {
                        return None;
                    }
                } else if first - head >= len {
                    // wrapped: free space is [head, first)
                    head
                } else {
                    return None;
                }
            }
            _ => 0,
        };
        self.blocks.push_back((off, len, false));
        Some(off)
    }

    /// Frees the block at `off`. Panics on an offset that was not handed out (a runtime bug).
    pub fn free(&mut self, off: usize) {
        let b = self.blocks.iter_mut().find(|b| b.0 == off && !b.2).expect("staging block freed twice or never allocated");
        b.2 = true;
        while self.blocks.front().is_some_and(|b| b.2) {
            self.blocks.pop_front();
        }
    }
}
