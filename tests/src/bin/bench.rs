//! `cargo xtask bench [--quick] [--services N,...] [--duration S] [--out DIR]`:
//! see `integration_tests::bench`.
fn main() {
    let argv: Vec<String> = std::env::args().collect();
    integration_tests::bench::main(&argv);
}
