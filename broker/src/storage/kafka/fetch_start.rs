//! Where to start fetching a partition so that a wanted offset really comes back.
//!
//! Kafka answers a fetch at offset N with the record batch that *contains* N, and the client
//! drops the records before N. Some Kafka-protocol brokers answer with the batches that *start*
//! at or after N instead (tansu 0.6 does): fetching from an offset in the middle of a batch then
//! silently skips the rest of that batch. The router resumes at the offset after the last record
//! it stored, and an APPLICATION reader at the first unacknowledged entry, and both of those lie
//! inside a batch often enough; the crash tests lost DEVICE messages that way.
//!
//! So readers start a little earlier than they want, skip what lies below the wanted offset,
//! and, if the first record that arrives is still past it, go back further (up to the log
//! start). That is correct on both kinds of broker and costs Kafka one slightly larger fetch.

/// How far before the wanted offset the first fetch starts.
const INITIAL_LOOKBACK: i64 = 1_024;
/// Each further attempt goes back this many times further.
const LOOKBACK_GROWTH: i64 = 16;

/// The fetch state of one partition.
#[derive(Debug, Clone)]
pub struct FetchStart {
    /// The next offset the reader must see.
    want: i64,
    /// The partition's first offset (log start) when the read began.
    low: i64,
    /// Where the current fetch starts.
    from: i64,
    /// Whether a record at or below `want` arrived since the fetch (re)started: from then on,
    /// records arrive in order and a jump is a real gap.
    confirmed: bool,
}

/// What to do with a record a fetch returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Below the wanted offset: already handled, skip it.
    Skip,
    /// The wanted record: use it.
    Take,
    /// Past the wanted offset although the log still holds it: fetch again from this offset
    /// (and ignore the rest of what the old fetch returned).
    Rewind(i64),
    /// Past the wanted offset and nothing earlier can be fetched (deleted by retention, or a
    /// hole in the log): use it; the caller reports the gap.
    Gap { expected: i64 },
}

impl FetchStart {
    /// A read that wants `want` next, in a partition whose log starts at `low`.
    pub fn new(want: i64, low: i64) -> FetchStart {
        FetchStart {
            want,
            low,
            from: (want - INITIAL_LOOKBACK).max(low),
            confirmed: false,
        }
    }

    /// A partition already read up to `want` (nothing to look back for).
    pub fn confirmed_at(want: i64) -> FetchStart {
        FetchStart {
            want,
            low: want,
            from: want,
            confirmed: true,
        }
    }

    /// The offset to fetch from.
    pub fn from(&self) -> i64 {
        self.from
    }

    /// The next offset the reader must see.
    pub fn want(&self) -> i64 {
        self.want
    }

    /// Classifies the record at `offset` and advances past it when it is taken.
    pub fn step(&mut self, offset: i64) -> Step {
        if offset < self.want {
            self.confirmed = true;
            return Step::Skip;
        }
        if offset == self.want {
            self.confirmed = true;
            self.want = offset + 1;
            return Step::Take;
        }
        if !self.confirmed && self.from > self.low {
            let lookback = (self.want - self.from).max(1) * LOOKBACK_GROWTH;
            self.from = (self.want - lookback).max(self.low);
            return Step::Rewind(self.from);
        }
        let expected = self.want;
        self.confirmed = true;
        self.want = offset + 1;
        Step::Gap { expected }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays what a broker returns, given its batch boundaries, for a fetch at `from`:
    /// `containing` = Kafka (the batch holding `from`), else tansu (batches starting at or after).
    fn fetch(batches: &[(i64, i64)], from: i64, containing: bool) -> Vec<i64> {
        batches
            .iter()
            .filter(|(base, end)| {
                if containing {
                    *end > from
                } else {
                    *base >= from
                }
            })
            .flat_map(|(base, end)| *base..*end)
            .collect()
    }

    fn read_all(batches: &[(i64, i64)], want: i64, low: i64, containing: bool) -> Vec<i64> {
        let mut state = FetchStart::new(want, low);
        let mut taken = Vec::new();
        let mut records = fetch(batches, state.from(), containing);
        let mut i = 0;
        while i < records.len() {
            match state.step(records[i]) {
                Step::Skip => i += 1,
                Step::Take | Step::Gap { .. } => {
                    taken.push(records[i]);
                    i += 1;
                }
                Step::Rewind(from) => {
                    records = fetch(batches, from, containing);
                    i = 0;
                }
            }
        }
        taken
    }

    #[test]
    fn a_wanted_offset_inside_a_batch_is_read_on_either_kind_of_broker() {
        let batches = [(0, 100), (100, 3_000), (3_000, 3_010)];
        for containing in [true, false] {
            for want in [0, 5, 100, 150, 2_999, 3_000, 3_005] {
                let got = read_all(&batches, want, 0, containing);
                assert_eq!(got, (want..3_010).collect::<Vec<_>>(), "want {want}");
            }
        }
    }

    #[test]
    fn records_deleted_before_the_wanted_offset_are_a_gap_not_a_loop() {
        // The log starts at 500 (retention), the reader wants 200.
        let batches = [(500, 600)];
        let mut state = FetchStart::new(200, 500);
        assert_eq!(state.from(), 500);
        assert_eq!(state.step(500), Step::Gap { expected: 200 });
        assert_eq!(state.step(501), Step::Take);
        assert_eq!(read_all(&batches, 200, 500, false).len(), 100);
    }

    #[test]
    fn a_jump_after_reading_in_order_is_a_gap() {
        let mut state = FetchStart::new(10, 0);
        assert_eq!(state.step(10), Step::Take);
        assert_eq!(state.step(12), Step::Gap { expected: 11 });
        assert_eq!(state.want(), 13);
        let mut state = FetchStart::confirmed_at(7);
        assert_eq!(state.step(9), Step::Gap { expected: 7 });
    }
}
