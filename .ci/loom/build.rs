fn main() {
    // Makes the breaker's `sync` module use loom's atomics.
    println!("cargo:rustc-cfg=upstream_guard_loom");
}
