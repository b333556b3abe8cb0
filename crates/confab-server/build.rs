//! How release builds of the `confab` binary on x86_64 Linux are linked (see ARCHITECTURE.md,
//! "The release binary's layout"):
//! - The functions the server actually runs are laid out side by side at the start of its code
//!   (`text-order.txt`, made by `bench/text_order.sh`). The kernel maps a binary's code in
//!   64 KiB blocks around each page it runs; scattered over the whole text, the ~6 MiB the
//!   server executes kept nearly all of its 27 MB resident. A name the file lists that the build
//!   no longer has is skipped, so a stale file costs memory, never the build.
//! - Relative relocations are packed (`DT_RELR`, glibc 2.36+): the 1.4 MB table the dynamic
//!   loader reads at every start shrinks to 16 KB, and with it the memory that stays mapped.
//!
//! `CONFAB_TEXT_ORDER=0` turns both off (e.g. with a linker other than LLD, Rust's default on
//! this target, or an older glibc).

use std::path::Path;

fn main() {
    let file = Path::new("text-order.txt");
    println!("cargo:rerun-if-changed={}", file.display());
    println!("cargo:rerun-if-env-changed=CONFAB_TEXT_ORDER");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let target = std::env::var("TARGET").unwrap_or_default();
    let wanted = std::env::var("CONFAB_TEXT_ORDER").map_or(true, |v| v != "0");
    if !(release && wanted && target == "x86_64-unknown-linux-gnu") {
        return;
    }
    println!("cargo:rustc-link-arg-bin=confab=-Wl,-z,pack-relative-relocs");
    if file.exists() {
        let path = std::fs::canonicalize(file).expect("text-order.txt has a path");
        println!(
            "cargo:rustc-link-arg-bin=confab=-Wl,--symbol-ordering-file={}",
            path.display()
        );
        println!("cargo:rustc-link-arg-bin=confab=-Wl,--no-warn-symbol-ordering");
    }
}
