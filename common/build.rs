//! Rebuilds the crate when a migration is added or edited: `sqlx::migrate!` reads the directory
//! at compile time, and stable Rust cannot tell cargo to watch it from inside the macro.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
