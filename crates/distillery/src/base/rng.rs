//! A small seeded generator (SplitMix64) for decisions that must not depend on batch
//! composition or thread scheduling: each item gets its own stream from `(seed, key)`.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// A stream for one item, independent of every other key's.
    pub fn for_key(seed: u64, key: u64) -> Self {
        let mut s = SplitMix64(seed ^ key.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        s.next_u64();
        s
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_f64() * n as f64) as usize % n.max(1)
    }
}

/// Every seeded stream a stage draws from, in one place, so that key layouts are documented
/// and cannot collide within a stage. The numeric keys are those earlier releases used, so
/// seeded outputs stay the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// kd-generate: sample `sample` of prompt record `record`.
    Generate { record: usize, sample: usize },
    /// kd-augment: copy `copy` of operation `op` on record `record`; `return_trip` is
    /// back-translation's second generation.
    Augment { record: usize, op: usize, copy: usize, return_trip: bool },
    /// kd-augment: which records get augmented.
    AugmentPick,
    /// Training: the data order of one epoch.
    Epoch(usize),
    /// On-policy training: whether micro-batch `micro` of `step` is sampled.
    OnPolicyCoin { step: usize, micro: usize },
    /// On-policy training: the sampling of row `row` of micro-batch `micro` of `step`.
    OnPolicySample { step: usize, micro: usize, row: usize },
}

impl Stream {
    fn key(self) -> u64 {
        match self {
            Stream::Generate { record, sample } => (record as u64) << 20 | sample as u64,
            Stream::Augment { record, op, copy, return_trip } => {
                ((record as u64) << 24) ^ ((op as u64) << 16) ^ copy as u64 ^ if return_trip { 1 << 63 } else { 0 }
            }
            Stream::AugmentPick => u64::MAX,
            Stream::Epoch(e) => e as u64,
            // Tagged high bits keep these apart from the epochs' small keys.
            Stream::OnPolicyCoin { step, micro } => 1 << 62 | (step as u64) << 16 | micro as u64,
            Stream::OnPolicySample { step, micro, row } => 1 << 61 | (step as u64) << 28 | (micro as u64) << 16 | row as u64,
        }
    }
}

/// The seeded stream of one [`Stream`].
pub fn stream(seed: u64, s: Stream) -> SplitMix64 {
    SplitMix64::for_key(seed, s.key())
}
