//! Padded batches of token sequences, and the row chunks long computations go through.
//! Every stage builds its batches here: training, evaluation, scoring and generation.
use tch::{Device, Kind, Tensor};

/// Which end of a short sequence gets the padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadSide {
    /// Tokens first (training, scoring, evaluation).
    Right,
    /// Tokens last, so every row's next token comes at the same position (generation).
    Left,
}

/// Sequences padded to a common length.
pub struct Padded {
    /// `[b, t]` int64
    pub input_ids: Tensor,
    /// `[b, t]` int64, 1 for real tokens
    pub attention_mask: Tensor,
    /// Indices of the sequences in this batch, in the caller's order.
    pub rows: Vec<usize>,
}

/// Pads `seqs[rows]` to the longest of them (at least `min_len`) with `pad`.
pub fn pad(seqs: &[&[i64]], rows: &[usize], pad: i64, side: PadSide, min_len: usize, device: Device) -> Padded {
    let t = rows.iter().map(|&i| seqs[i].len()).max().unwrap_or(0).max(min_len);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let mut mask = Vec::with_capacity(rows.len() * t);
    for &i in rows {
        let s = seqs[i];
        let fill = t - s.len();
        if side == PadSide::Left {
            ids.extend(std::iter::repeat_n(pad, fill));
            mask.extend(std::iter::repeat_n(0i64, fill));
        }
        ids.extend_from_slice(s);
        mask.extend(std::iter::repeat_n(1i64, s.len()));
        if side == PadSide::Right {
            ids.extend(std::iter::repeat_n(pad, fill));
            mask.extend(std::iter::repeat_n(0i64, fill));
        }
    }
    let shape = [rows.len() as i64, t as i64];
    Padded {
        input_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
        attention_mask: Tensor::from_slice(&mask).view(shape).to_device(device),
        rows: rows.to_vec(),
    }
}

/// Right-padded with `pad`, as scoring and evaluation use.
pub fn pad_right(seqs: &[&[i64]], rows: &[usize], pad_id: i64, device: Device) -> Padded {
    pad(seqs, rows, pad_id, PadSide::Right, 0, device)
}

/// Groups sequences of similar length (longest first) into right-padded batches of at most
/// `batch_size` sequences.
pub fn length_sorted_batches(seqs: &[&[i64]], batch_size: usize, pad_id: i64, device: Device) -> Vec<Padded> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    order.chunks(batch_size.max(1)).map(|rows| pad_right(seqs, rows, pad_id, device)).collect()
}

/// Positions that predict a real next token: `[b, t-1]` bool (position i predicts token i+1).
pub fn predicted_positions(attention_mask: &Tensor) -> Tensor {
    let t = attention_mask.size()[1];
    attention_mask.narrow(1, 1, t - 1).ne(0)
}

/// Elements of one `[rows, vocab]` fp32 chunk when the chunk size is automatic, so peak
/// memory stays flat as the vocabulary grows. On CPU 4M (16 MiB): under glibc's largest mmap
/// threshold, so chunk buffers are reused instead of mapped and faulted in each time (see
/// [`crate::base::alloc::tune_cpu_allocator`]). On a GPU 128M (512 MiB): a thousand rows at a
/// 128k vocabulary, so a micro-batch is a few large matmuls rather than dozens of small ones.
pub const CHUNK_ELEMENTS_CPU: i64 = 1 << 22;
pub const CHUNK_ELEMENTS_GPU: i64 = 1 << 27;
/// The CPU budget of the fused loss's one-sweep path (`train::logit_grad`), in bytes per
/// `[rows, vocab]` buffer of the head's dtype (it holds three, allocated once a micro-batch).
/// bf16: 16 MiB, 170 rows at SmolLM2's vocabulary; its products run at a third more rows a
/// second at 170 rows than at 85, and whole steps at 340 or 512 rows were no faster. fp32:
/// just under glibc's mmap threshold (32 MiB, so the buffers come from the heap, not fresh
/// pages), 170 rows there: in four alternating pairs of SmolLM2 steps 3.38 s against 3.78 s at
/// 85 rows (less CPU time in each pair), for 50-80 MiB more peak memory.
pub fn sweep_chunk_bytes(kind: Kind) -> i64 {
    match kind {
        Kind::Float => (1 << 25) - (1 << 16),
        _ => 1 << 24,
    }
}

/// Token rows per chunk: `requested` when positive, else as many as fit the device's budget.
pub fn chunk_rows(requested: i64, vocab: i64, device: Device) -> i64 {
    if requested > 0 {
        return requested;
    }
    let budget = if device.is_cuda() { CHUNK_ELEMENTS_GPU } else { CHUNK_ELEMENTS_CPU };
    (budget / vocab.max(1)).max(16)
}

/// `(start, len)` of consecutive chunks of at most `chunk` rows covering `0..n`.
pub fn row_chunks(n: i64, chunk: i64) -> impl Iterator<Item = (i64, i64)> {
    (0..n).step_by(chunk.max(1) as usize).map(move |start| (start, chunk.max(1).min(n - start)))
}

/// Sum of a tensor as f64 on the host.
pub fn sum_f64(t: &Tensor) -> f64 {
    t.sum(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_on_either_side_masks_the_fill() {
        let a: &[i64] = &[5, 6, 7];
        let b: &[i64] = &[8];
        let right = pad(&[a, b], &[0, 1], 0, PadSide::Right, 0, Device::Cpu);
        assert_eq!(Vec::<i64>::try_from(right.input_ids.view([-1])).unwrap(), [5, 6, 7, 8, 0, 0]);
        assert_eq!(Vec::<i64>::try_from(right.attention_mask.view([-1])).unwrap(), [1, 1, 1, 1, 0, 0]);
        let left = pad(&[a, b], &[1, 0], 9, PadSide::Left, 0, Device::Cpu);
        assert_eq!(Vec::<i64>::try_from(left.input_ids.view([-1])).unwrap(), [9, 9, 8, 5, 6, 7]);
        assert_eq!(Vec::<i64>::try_from(left.attention_mask.view([-1])).unwrap(), [0, 0, 1, 1, 1, 1]);
        let min = pad(&[b], &[0], 0, PadSide::Right, 2, Device::Cpu);
        assert_eq!(min.input_ids.size(), [1, 2]);
    }

    #[test]
    fn chunks_cover_every_row_once() {
        let c: Vec<(i64, i64)> = row_chunks(10, 4).collect();
        assert_eq!(c, [(0, 4), (4, 4), (8, 2)]);
        assert_eq!(row_chunks(0, 4).count(), 0);
        assert_eq!(chunk_rows(7, 1000, Device::Cpu), 7);
        assert_eq!(chunk_rows(0, 1 << 20, Device::Cpu), 16);
    }
}
