//! The copy's durable progress: what a resumed job must copy again.
//!
//! Carried in a record (journal format 2) as the extension field with tag
//! [`PROGRESS_TAG`], optional (a reader that does not know it may ignore
//! it: the job then starts its copy over, which is always safe). Two
//! parts:
//!
//! - the *cursor*: every byte below it was copied and made durable on the
//!   destination, and has not changed on the source since except in the
//!   extents listed;
//! - the *extents that may differ* (md's write-intent bitmap, DRBD's
//!   activity log): runs of extents, `extent_size` bytes each, in which a
//!   mirrored guest write may have reached one image and not the other, or
//!   which a resumed job still has to copy again.
//!
//! A resumed job copies `[cursor, size)` and every listed extent. Listing
//! more than needed is always safe (it costs a recopy), so a set that does
//! not fit is coarsened by joining runs, never truncated.
//!
//! Encoding (little-endian), journal-format.md section 6.4:
//!
//! ```text
//! u32 version (1) | u64 extent_size | u64 size | u64 cursor | u32 n
//! n x (u64 first extent, u64 extent count)
//! ```

use std::ops::Range;

use super::payload::Extension;

/// The extension tag of the progress field (optional: bit 15 clear).
pub const PROGRESS_TAG: u16 = 1;
/// Runs at most (2 KiB); more are joined (coarsened) to fit. A record
/// whose image names leave less room gets fewer (`Progress::coarser`).
pub const MAX_RUNS: usize = 128;
const VERSION: u32 = 1;
const HEAD: usize = 4 + 8 + 8 + 8 + 4;

/// The durable progress of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Bytes per extent: a power of two, at least 4096.
    pub extent_size: u64,
    /// The source's size the progress is about.
    pub size: u64,
    /// Everything below is on the destination, durably, except `extents`.
    pub cursor: u64,
    /// Runs of extent indexes, sorted, disjoint, not adjacent, at most
    /// [`MAX_RUNS`].
    pub runs: Vec<Range<u64>>,
}

impl Progress {
    /// Nothing copied yet.
    pub fn start(extent_size: u64, size: u64) -> Progress {
        Progress {
            extent_size,
            size,
            cursor: 0,
            runs: Vec::new(),
        }
    }

    /// Progress with `extents` (indexes, any order) listed, coarsened to
    /// [`MAX_RUNS`] runs.
    pub fn with_extents(
        extent_size: u64,
        size: u64,
        cursor: u64,
        extents: impl IntoIterator<Item = u64>,
    ) -> Progress {
        let mut sorted: Vec<u64> = extents.into_iter().collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut runs: Vec<Range<u64>> = Vec::new();
        for e in sorted {
            match runs.last_mut() {
                Some(last) if last.end == e => last.end += 1,
                _ => runs.push(e..e + 1),
            }
        }
        coarsen(&mut runs);
        Progress {
            extent_size,
            size,
            cursor,
            runs,
        }
    }

    /// The same progress with at most half the runs (joined, so every
    /// extent stays listed), or `None` when it has one run or none: the
    /// caller then records no progress at all (a resume copies
    /// everything).
    pub fn coarser(&self) -> Option<Progress> {
        if self.runs.len() <= 1 {
            return None;
        }
        let mut runs = self.runs.clone();
        coarsen_to(&mut runs, self.runs.len() / 2);
        Some(Progress {
            runs,
            ..self.clone()
        })
    }

    /// Whether extent `e` is listed.
    pub fn lists(&self, e: u64) -> bool {
        self.runs.iter().any(|r| r.contains(&e))
    }

    /// Every listed extent index.
    pub fn extents(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|r| r.clone())
    }

    /// The byte ranges a resumed job copies again, in order, within the
    /// image: the listed extents below the cursor, then `[cursor, size)`.
    pub fn to_copy(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut push = |r: Range<u64>| {
            if r.is_empty() {
                return;
            }
            match out.last_mut() {
                Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        };
        for run in &self.runs {
            let start = run.start.saturating_mul(self.extent_size).min(self.size);
            let end = run.end.saturating_mul(self.extent_size).min(self.size);
            if start >= self.cursor {
                break;
            }
            push(start..end.min(self.cursor));
        }
        push(self.cursor.min(self.size)..self.size);
        out
    }

    /// Bytes [`Progress::to_copy`] covers.
    pub fn bytes_to_copy(&self) -> u64 {
        self.to_copy().iter().map(|r| r.end - r.start).sum()
    }

    /// The invariants, checked before writing and after reading.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.extent_size.is_power_of_two() || self.extent_size < 4096 {
            return Err("progress extent size is not a power of two >= 4096");
        }
        if self.cursor > self.size {
            return Err("progress cursor beyond the image");
        }
        if self.runs.len() > MAX_RUNS {
            return Err("too many progress runs");
        }
        let extents = self.size.div_ceil(self.extent_size);
        let mut previous_end = None;
        for run in &self.runs {
            if run.is_empty() || run.end > extents {
                return Err("progress run empty or beyond the image");
            }
            if previous_end.is_some_and(|end| run.start <= end) {
                return Err("progress runs out of order, overlapping or adjacent");
            }
            previous_end = Some(run.end);
        }
        Ok(())
    }

    /// The extension field that carries this progress.
    pub fn to_extension(&self) -> Extension {
        debug_assert!(self.check().is_ok(), "{self:?}");
        let mut data = Vec::with_capacity(HEAD + 16 * self.runs.len());
        data.extend_from_slice(&VERSION.to_le_bytes());
        data.extend_from_slice(&self.extent_size.to_le_bytes());
        data.extend_from_slice(&self.size.to_le_bytes());
        data.extend_from_slice(&self.cursor.to_le_bytes());
        data.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        for run in &self.runs {
            data.extend_from_slice(&run.start.to_le_bytes());
            data.extend_from_slice(&(run.end - run.start).to_le_bytes());
        }
        Extension {
            tag: PROGRESS_TAG,
            data,
        }
    }

    /// Decodes a progress field; `Err` names what is wrong.
    pub fn from_extension(extension: &Extension) -> Result<Progress, &'static str> {
        if extension.tag != PROGRESS_TAG {
            return Err("not a progress field");
        }
        let data = &extension.data;
        if data.len() < HEAD {
            return Err("progress field too short");
        }
        let u32_at = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
        if u32_at(0) != VERSION {
            return Err("progress field of an unknown version");
        }
        let n = u32_at(28) as usize;
        if n > MAX_RUNS || data.len() != HEAD + 16 * n {
            return Err("progress field length does not match its run count");
        }
        let mut runs = Vec::with_capacity(n);
        for i in 0..n {
            let first = u64_at(HEAD + 16 * i);
            let count = u64_at(HEAD + 16 * i + 8);
            let end = first.checked_add(count).ok_or("progress run overflows")?;
            runs.push(first..end);
        }
        let progress = Progress {
            extent_size: u64_at(4),
            size: u64_at(12),
            cursor: u64_at(20),
            runs,
        };
        progress.check()?;
        Ok(progress)
    }
}

/// Joins the runs with the smallest gaps until at most [`MAX_RUNS`] are
/// left: every extent listed before stays listed.
fn coarsen(runs: &mut Vec<Range<u64>>) {
    coarsen_to(runs, MAX_RUNS);
}

fn coarsen_to(runs: &mut Vec<Range<u64>>, most: usize) {
    while runs.len() > most.max(1) {
        let (i, _) = runs
            .windows(2)
            .enumerate()
            .min_by_key(|(_, w)| w[1].start - w[0].end)
            .expect("more than one run");
        let next = runs.remove(i + 1);
        runs[i].end = next.end;
    }
}
