// Same link settings as the library crate (libtorch kept linked, rpath to the venv).
include!("../distillery/build.rs");
