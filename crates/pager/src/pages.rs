//! Per-page bookkeeping over the flat memory range: a bitmap, and the first-touch log that
//! feeds prefetching.
//!
//! Both are sized from the validated regions (one bit per 4 KiB page: 32 KiB per GiB of guest
//! memory), so nothing a VMM sends can make them grow.

use crate::regions::PAGE_SIZE;

/// The words, and the bits within each, that cover the pages of `[start, end)` (page-aligned
/// byte offsets) in a bitmap of `pages` pages: whole words at a time, clipped to the bitmap.
pub(crate) fn word_masks(start: u64, end: u64, pages: u64) -> impl Iterator<Item = (usize, u64)> {
    let end_page = (end / PAGE_SIZE).min(pages);
    let mut page = start / PAGE_SIZE;
    std::iter::from_fn(move || {
        if page >= end_page {
            return None;
        }
        let word = usize::try_from(page / 64).ok()?;
        let first_bit = page % 64;
        let bits = (end_page - page).min(64 - first_bit);
        let mask = if bits == 64 {
            u64::MAX
        } else {
            ((1u64 << bits) - 1) << first_bit
        };
        page += bits;
        Some((word, mask))
    })
}

/// One bit per page of `[0, pages * PAGE_SIZE)`.
#[derive(Debug, Clone, Default)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl PageBitmap {
    /// An all-clear bitmap of `pages` pages.
    pub fn new(pages: u64) -> Self {
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
        Self {
            words: vec![0; words],
            pages,
        }
    }

    /// Whether the page holding `offset` is set (false outside the bitmap).
    pub fn contains(&self, offset: u64) -> bool {
        let Some((word, bit)) = self.position(offset / PAGE_SIZE) else {
            return false;
        };
        self.words[word] & bit != 0
    }

    /// Sets the page holding `offset`; returns true if it was clear. Ignored outside.
    pub fn insert(&mut self, offset: u64) -> bool {
        let Some((word, bit)) = self.position(offset / PAGE_SIZE) else {
            return false;
        };
        let was_clear = self.words[word] & bit == 0;
        self.words[word] |= bit;
        was_clear
    }

    /// Sets every page that `[start, end)` (byte offsets, page-aligned) covers, clipped to the
    /// bitmap; whole words at a time.
    pub fn insert_range(&mut self, start: u64, end: u64) {
        for (word, mask) in word_masks(start, end, self.pages) {
            if let Some(w) = self.words.get_mut(word) {
                *w |= mask;
            }
        }
    }

    /// Number of set pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn position(&self, page: u64) -> Option<(usize, u64)> {
        if page >= self.pages {
            return None;
        }
        let word = usize::try_from(page / 64).ok()?;
        Some((word, 1u64 << (page % 64)))
    }
}

/// Pages in first-touch order, each once.
#[derive(Debug, Clone, Default)]
pub struct TouchLog {
    seen: PageBitmap,
    order: Vec<u64>,
}

impl TouchLog {
    /// A log for a range of `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            seen: PageBitmap::new(pages),
            order: Vec::new(),
        }
    }

    /// Records the page at `offset` (page-aligned) unless it was recorded before.
    pub fn record(&mut self, offset: u64) {
        if self.seen.insert(offset) {
            self.order.push(offset);
        }
    }

    /// Page offsets in first-touch order.
    pub fn pages(&self) -> &[u64] {
        &self.order
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn test_insert_twice_reports_new_once() {
        let mut bitmap = PageBitmap::new(10);
        assert!(bitmap.insert(3 * PAGE_SIZE));
        assert!(!bitmap.insert(3 * PAGE_SIZE + 17));
        assert!(bitmap.contains(3 * PAGE_SIZE + 4095));
        assert!(!bitmap.contains(4 * PAGE_SIZE));
    }

    #[test]
    fn test_insert_outside_is_ignored() {
        let mut bitmap = PageBitmap::new(2);
        assert!(!bitmap.insert(2 * PAGE_SIZE));
        assert!(!bitmap.contains(2 * PAGE_SIZE));
        assert!(!bitmap.contains(u64::MAX));
        assert_eq!(bitmap.count(), 0);
    }

    #[test]
    fn test_touch_log_keeps_first_touch_order() {
        let mut log = TouchLog::new(16);
        for page in [5u64, 1, 5, 9, 1, 0] {
            log.record(page * PAGE_SIZE);
        }
        assert_eq!(log.pages(), &[5 * PAGE_SIZE, PAGE_SIZE, 9 * PAGE_SIZE, 0]);
    }

    proptest! {
        #[test]
        fn test_insert_range_matches_per_page_inserts(
            pages in 1u64..300, start in 0u64..320, len in 0u64..320,
        ) {
            let mut fast = PageBitmap::new(pages);
            fast.insert_range(start * PAGE_SIZE, (start + len) * PAGE_SIZE);
            let expected: BTreeSet<u64> = (start..start + len).filter(|p| *p < pages).collect();
            for page in 0..pages + 2 {
                prop_assert_eq!(fast.contains(page * PAGE_SIZE), expected.contains(&page), "page {}", page);
            }
            prop_assert_eq!(fast.count(), u64::try_from(expected.len()).expect("small"));
        }
    }
}
