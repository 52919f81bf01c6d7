//! The dirty bitmap: which granules of the destination may still differ
//! from the source. One bit per granule in atomic words, so guest threads
//! and copy workers never take a lock to read or flip a bit.
//!
//! Memory: at the default 64 KiB granule, 1 TiB is 16 Mi bits = 2 MiB.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-size set of granule indexes.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    granules: u64,
    set: AtomicU64,
}

impl DirtyBitmap {
    /// A bitmap of `granules` bits, all clear.
    pub fn new(granules: u64) -> Self {
        let words = granules.div_ceil(64) as usize;
        DirtyBitmap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            granules,
            set: AtomicU64::new(0),
        }
    }

    /// Number of granules.
    pub fn len(&self) -> u64 {
        self.granules
    }

    /// Whether the bitmap has no granules at all.
    pub fn is_empty(&self) -> bool {
        self.granules == 0
    }

    /// Bytes of memory the bits take.
    pub fn memory_bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.set.load(Ordering::Acquire)
    }

    /// Sets bit `index`; returns whether it was clear.
    pub fn set(&self, index: u64) -> bool {
        assert!(index < self.granules);
        let mask = 1u64 << (index % 64);
        let old = self.words[(index / 64) as usize].fetch_or(mask, Ordering::AcqRel);
        let newly = old & mask == 0;
        if newly {
            self.set.fetch_add(1, Ordering::AcqRel);
        }
        newly
    }

    /// Clears bit `index`; returns whether it was set.
    pub fn clear(&self, index: u64) -> bool {
        assert!(index < self.granules);
        let mask = 1u64 << (index % 64);
        let old = self.words[(index / 64) as usize].fetch_and(!mask, Ordering::AcqRel);
        let was = old & mask != 0;
        if was {
            self.set.fetch_sub(1, Ordering::AcqRel);
        }
        was
    }

    /// Whether bit `index` is set.
    pub fn get(&self, index: u64) -> bool {
        assert!(index < self.granules);
        self.words[(index / 64) as usize].load(Ordering::Acquire) & (1u64 << (index % 64)) != 0
    }

    /// The first set bit at or after `from`, skipping clear words whole.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        self.next_set_before(from, self.granules)
    }

    /// The first set bit in `from..end`, a word at a time: the cost is the
    /// range's, never the bitmap's tail.
    pub fn next_set_before(&self, from: u64, end: u64) -> Option<u64> {
        let end = end.min(self.granules);
        let mut index = from;
        while index < end {
            let word = self.words[(index / 64) as usize].load(Ordering::Acquire);
            let bits = word >> (index % 64);
            if bits != 0 {
                let found = index + u64::from(bits.trailing_zeros());
                return (found < end).then_some(found);
            }
            index = (index / 64 + 1) * 64;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count_and_scan() {
        let map = DirtyBitmap::new(200);
        assert_eq!(map.next_set(0), None);
        assert!(map.set(3));
        assert!(!map.set(3));
        assert!(map.set(130));
        assert!(map.set(199));
        assert_eq!(map.count(), 3);
        assert_eq!(map.next_set(0), Some(3));
        assert_eq!(map.next_set(4), Some(130));
        assert_eq!(map.next_set(131), Some(199));
        assert!(map.clear(130));
        assert!(!map.clear(130));
        assert_eq!(map.next_set(4), Some(199));
        assert_eq!(map.count(), 2);
        assert_eq!(map.memory_bytes(), 32);
        // Bounded: nothing past `end`, whatever is set there.
        assert_eq!(map.next_set_before(4, 199), None);
        assert_eq!(map.next_set_before(4, 200), Some(199));
        assert_eq!(map.next_set_before(0, 3), None);
        assert_eq!(map.next_set_before(0, 4), Some(3));
        assert_eq!(map.next_set_before(3, 1000), Some(3));
        let mut cases = 0;
        for from in 0..200 {
            for end in from..=210 {
                let want = (from..end.min(200)).find(|&i| map.get(i));
                assert_eq!(map.next_set_before(from, end), want, "{from}..{end}");
                cases += 1;
            }
        }
        println!("next_set_before: {cases} ranges");
    }

    #[test]
    fn a_tebibyte_at_the_default_granularity_takes_two_mebibytes() {
        let granules = (1u64 << 40) / (64 << 10);
        assert_eq!(DirtyBitmap::new(granules).memory_bytes(), 2 << 20);
    }
}
