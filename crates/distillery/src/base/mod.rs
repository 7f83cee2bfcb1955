//! The base layer: what every other layer uses and nothing model-specific. Atomic file
//! output, resumable journals, output locks, stop signals, padded token batches and row
//! chunks, seeded random streams, device and precision selection, fp32 and bf16 elements for
//! kernels on tensor memory, MKL's bf16 matrix products and its square root, parallel loops on libtorch's
//! threads, progress on stderr, the allocator settings of a stage process, the command log,
//! and the statistics of reports.
pub mod alloc;
pub mod batch;
pub mod device;
pub mod elem;
pub mod gemm;
pub mod io;
pub mod journal;
pub mod lock;
pub mod omp;
pub mod progress;
pub mod provenance;
pub mod rng;
pub mod signals;
pub mod stats;
pub mod vml;
