// Link settings for every stage binary.
//
// * libtorch's CUDA half is not linked: Rust links with `--as-needed`, which drops
//   `libtorch.so` and `libtorch_cuda.so` (no symbol of theirs is used), and
//   `base::device::load_cuda` loads `libtorch_cuda.so` when a GPU is asked for, so a CPU
//   run does not carry the CUDA libraries (235 MiB resident).
// * rpath to the venv's `torch/lib`, so the binaries run without `LD_LIBRARY_PATH`.
// * the tch and libtorch versions compiled in (`DISTILLERY_TCH_VERSION`,
//   `DISTILLERY_LIBTORCH_VERSION`), for the reproducibility card of kd-report.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PYTHON");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let out = Command::new(&python)
        .args(["-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib')); print(torch.__version__)"])
        .output();
    let mut libtorch = "unknown".to_string();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            let mut lines = text.lines();
            let dir = lines.next().unwrap_or_default().trim().to_string();
            libtorch = lines.next().unwrap_or("unknown").trim().to_string();
            println!("cargo:rustc-link-search=native={dir}");
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
        _ => println!("cargo:warning=could not locate torch with `{python}`; set LD_LIBRARY_PATH at run time"),
    }
    println!("cargo:rustc-env=DISTILLERY_LIBTORCH_VERSION={libtorch}");
    println!("cargo:rustc-env=DISTILLERY_TCH_VERSION={}", locked_version("tch"));
}

/// The version of `package` in the workspace's Cargo.lock (what was really compiled).
fn locked_version(package: &str) -> String {
    let lock = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join("../../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = std::fs::read_to_string(lock).unwrap_or_default();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{package}\"") {
            if let Some(v) = lines.next().and_then(|l| l.trim().strip_prefix("version = ")) {
                return v.trim_matches('"').to_string();
            }
        }
    }
    "unknown".to_string()
}
