//! The next offset a reader of one partition must see, and what a record at another offset
//! means.
//!
//! Readers fetch from their stored position exactly: Kafka answers a fetch at offset N with the
//! batch that contains N and the client drops what lies before it, so the first record back is
//! N itself, unless N is gone. The producers here are idempotent and not transactional and no
//! topic is compacted, so offsets are dense: a later offset than the wanted one means records
//! were deleted before they were read (retention, or a truncation after an unclean leader
//! election). That is logged and counted by the caller, then reading goes on.

/// What to do with a record at some offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Below the wanted offset: handled already (a fetch that returned an earlier batch).
    Skip,
    /// The wanted record.
    Take,
    /// Past the wanted offset: `missing` offsets starting at `expected` are gone from the log.
    Gap { expected: i64, missing: i64 },
}

/// The next offset one partition's reader must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextOffset(i64);

impl NextOffset {
    pub fn new(next: i64) -> NextOffset {
        NextOffset(next)
    }

    pub fn get(self) -> i64 {
        self.0
    }

    /// Classifies the record at `offset` and moves past it unless it is skipped.
    pub fn step(&mut self, offset: i64) -> Step {
        if offset < self.0 {
            return Step::Skip;
        }
        let expected = self.0;
        self.0 = offset + 1;
        if offset == expected {
            Step::Take
        } else {
            Step::Gap {
                expected,
                missing: offset - expected,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_records_are_taken_and_earlier_ones_skipped() {
        let mut next = NextOffset::new(10);
        assert_eq!(next.step(9), Step::Skip);
        assert_eq!(next.step(10), Step::Take);
        assert_eq!(next.step(11), Step::Take);
        assert_eq!(next.get(), 12);
    }

    #[test]
    fn a_jump_is_a_gap_of_the_missing_offsets() {
        let mut next = NextOffset::new(200);
        assert_eq!(
            next.step(500),
            Step::Gap {
                expected: 200,
                missing: 300
            }
        );
        assert_eq!(next.step(501), Step::Take);
    }
}
