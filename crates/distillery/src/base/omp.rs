//! Parallel loops on libtorch's own OpenMP threads.
//!
//! libtorch runs its CPU kernels on an OpenMP team (GNU libgomp, which `libtorch_cpu.so`
//! loads), whose threads spin for a while after each parallel region before they sleep. Work
//! spread over another pool right after a libtorch op competes with those spinning threads
//! for the cores: on 2 cores a 7 ms sweep over a chunk of logits took 12 ms on rayon's
//! threads after a matrix product. Run as a parallel region of the same team (libgomp's
//! `GOMP_parallel`, the entry point `#pragma omp parallel` compiles to), it does not. Where
//! libgomp is not loaded, rayon runs the tasks.
use rayon::prelude::*;
use std::any::Any;
use std::ffi::{c_uint, c_void};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

type GompParallel = unsafe extern "C" fn(body: extern "C" fn(*mut c_void), data: *mut c_void, num_threads: c_uint, flags: c_uint);

fn gomp_parallel() -> Option<GompParallel> {
    static FOUND: OnceLock<Option<GompParallel>> = OnceLock::new();
    *FOUND.get_or_init(|| {
        // SAFETY: dlsym over the process's global symbols with a valid C string; a non-null
        // result is libgomp's GOMP_parallel, of the type above (its ABI since GCC 4.9).
        let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"GOMP_parallel".as_ptr()) };
        (!f.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, GompParallel>(f) })
    })
}

/// What every thread of the region reads: the tasks, a shared counter handing them out, and
/// the first panic (re-raised on the calling thread: unwinding must not cross libgomp).
struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

extern "C" fn run_job(data: *mut c_void) {
    // SAFETY: `data` is the `Job` that `parallel_tasks` keeps alive until `GOMP_parallel`
    // returns, which is after every thread of the region has left this function.
    let job = unsafe { &*(data as *const Job) };
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.tasks {
            return;
        }
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| (job.task)(i))) {
            job.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
            // Let the other threads run out of tasks.
            job.next.store(job.tasks, Ordering::Relaxed);
            return;
        }
    }
}

/// Runs `task(0) .. task(tasks - 1)`, each once, spread over libtorch's OpenMP threads (as many
/// as `tch::get_num_threads`), handed out one at a time; returns when all are done. A panic in
/// a task is re-raised here.
pub fn parallel_tasks(tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    if tasks == 0 {
        return;
    }
    let Some(parallel) = gomp_parallel() else {
        (0..tasks).into_par_iter().for_each(task);
        return;
    };
    let job = Job { task, tasks, next: AtomicUsize::new(0), panic: Mutex::new(None) };
    // SAFETY: `run_job` reads `job` only while this call runs (GOMP_parallel returns after the
    // region's threads are done); 0 threads is the team's default size, 0 flags a plain region.
    unsafe { parallel(run_job, &job as *const Job as *mut c_void, 0, 0) };
    if let Some(p) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        resume_unwind(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_on_libtorchs_threads() {
        assert!(gomp_parallel().is_some(), "libtorch_cpu.so loads libgomp");
        let counts: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        parallel_tasks(counts.len(), &|i| {
            counts[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        parallel_tasks(0, &|_| panic!("no task to run"));
    }

    #[test]
    fn a_panicking_task_panics_the_caller() {
        let r = catch_unwind(|| parallel_tasks(64, &|i| assert!(i != 17, "task {i} fails")));
        let message = r.expect_err("the panic reaches the caller");
        assert_eq!(message.downcast_ref::<String>().map(String::as_str), Some("task 17 fails"));
        // The team is still usable afterwards.
        let done = AtomicUsize::new(0);
        parallel_tasks(8, &|_| {
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 8);
    }
}
