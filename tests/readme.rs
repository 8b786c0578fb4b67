//! The README's promises about itself: its quickstart is a real program.

/// The first Rust block of the README's "Use it in axum" section.
fn readme_quickstart() -> String {
    let readme = include_str!("../README.md");
    let section = readme
        .split_once("## Use it in axum")
        .map(|(_, rest)| rest)
        .expect("the README has a \"Use it in axum\" section");
    let block = section
        .split_once("```rust\n")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .map(|(code, _)| code)
        .expect("the section has a Rust block");
    block.to_string()
}

#[test]
fn the_readme_quickstart_is_the_compiled_quickstart_example() {
    // `cargo build --examples` (in CI) compiles examples/quickstart.rs; the
    // README must show that exact program, so what a newcomer pastes compiles.
    let example = include_str!("../examples/quickstart.rs");
    assert_eq!(readme_quickstart(), example);
}

#[test]
fn the_readme_quickstart_is_a_whole_program() {
    let quickstart = readme_quickstart();
    assert!(quickstart.contains("async fn main()"));
    assert!(quickstart.contains("127.0.0.1"), "it binds loopback only");
}
