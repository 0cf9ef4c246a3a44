//! Gives every binary and test of this crate an rpath to the libtorch libraries it was
//! built against, so `sluice` runs without LD_LIBRARY_PATH from a checkout. Container
//! images copy the libraries and set LD_LIBRARY_PATH instead (see `deploy/`).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    for dir in libtorch_lib_dirs() {
        if dir.is_dir() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
        }
    }
}

fn libtorch_lib_dirs() -> Vec<PathBuf> {
    if let Ok(root) = std::env::var("LIBTORCH") {
        return vec![PathBuf::from(root).join("lib")];
    }
    let Ok(venv) = std::env::var("VIRTUAL_ENV") else {
        return Vec::new();
    };
    let lib = PathBuf::from(venv).join("lib");
    let Ok(entries) = std::fs::read_dir(&lib) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path().join("site-packages").join("torch").join("lib"))
        .collect()
}
