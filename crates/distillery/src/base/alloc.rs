//! Allocator settings for a pipeline-stage process.

/// libtorch's CPU allocator takes every tensor from glibc malloc. With glibc's defaults,
/// blocks above a moving mmap threshold get fresh mappings and freed heap tops go back to
/// the OS, so each training step faults in and zeroes its large activations again: about a
/// fifth of a CPU distillation step in `perf`. A fixed threshold at glibc's ceiling (32 MiB)
/// and no trimming keep freed blocks for reuse; the process keeps its high-water mark until
/// it exits (fine for a pipeline stage, which is why only the stage binaries' entry point calls this).
pub fn tune_cpu_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before tensors exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Hands the heap's free blocks back to the OS (`malloc_trim`). With trimming off (above),
/// what a one-off phase freed stays resident: loading a checkpoint reads every tensor before
/// copying it into the model, and the read copies (the size of the model) would otherwise
/// count in the process's memory for the rest of the run. Call it after such phases, not in
/// a loop: blocks freed and reused every step are better kept.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the OS; it touches no live block.
    unsafe {
        libc::malloc_trim(0);
    }
}
