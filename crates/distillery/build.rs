// Link settings for every stage binary.
//
// * `--no-as-needed -ltorch`: Rust links with `--as-needed`, which would drop
//   `libtorch.so` (and with it `libtorch_cuda.so`), leaving CUDA unavailable.
// * rpath to the venv's `torch/lib`, so the binaries run without `LD_LIBRARY_PATH`.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PYTHON");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let out = Command::new(&python)
        .args(["-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let dir = String::from_utf8_lossy(&o.stdout).trim().to_string();
            println!("cargo:rustc-link-search=native={dir}");
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
        _ => println!("cargo:warning=could not locate torch with `{python}`; set LD_LIBRARY_PATH at run time"),
    }
}
