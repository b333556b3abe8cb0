//! The CPU cost of sign-in's cryptography (issue 5, BENCHMARKS.md): access-token
//! verification (HS256 and EdDSA), access-token issue, and argon2id at the configured cost
//! (what a login spends).
//!
//! Usage: `cargo build --release -p confab-core --example auth_bench`, then
//! `target/release/examples/auth_bench [verifications] [argon2-samples]`.
#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

#[path = "common.rs"]
mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use base64::Engine as _;
use confab_core::domain::{RefreshFamilyId, UserId, now};
use confab_core::services::auth::SigningKey;
use confab_core::services::auth::crypto::{Argon2Cost, Passwords};
use confab_core::services::auth::jwt::AccessTokens;

fn ed25519_pem() -> Vec<u8> {
    let pair = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
    let der = pair.to_pkcs8v1().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n").into_bytes()
}

fn per_op(name: &str, n: u32, mut op: impl FnMut()) {
    for _ in 0..n / 10 {
        op(); // warm-up
    }
    let started = Instant::now();
    for _ in 0..n {
        op();
    }
    let each = started.elapsed() / n;
    println!(
        "{name:<28} {:>8.2} µs/op  ({n} ops)",
        each.as_secs_f64() * 1e6
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().map_or(200_000, |a| a.parse().unwrap());
    let samples: usize = args.next().map_or(50, |a| a.parse().unwrap());
    let ttl = Duration::from_mins(15);
    let leeway = Duration::from_secs(30);

    let hs = AccessTokens::new(
        &SigningKey::Hs256(b"bench-secret-bench-secret-bench-secret".to_vec()),
        ttl,
        leeway,
    )
    .unwrap();
    let (token, _) = hs.issue(UserId::new(), RefreshFamilyId::new(), now());
    per_op("HS256 verify", n, || {
        black_box(hs.verify(black_box(&token)).unwrap());
    });
    per_op("HS256 issue", n, || {
        black_box(hs.issue(UserId::new(), RefreshFamilyId::new(), now()));
    });
    let ed = AccessTokens::new(&SigningKey::EdDsa(ed25519_pem()), ttl, leeway).unwrap();
    let (token, _) = ed.issue(UserId::new(), RefreshFamilyId::new(), now());
    per_op("EdDSA verify", n / 4, || {
        black_box(ed.verify(black_box(&token)).unwrap());
    });

    let passwords = Passwords::new(Argon2Cost::default()).unwrap();
    let hash = passwords.hash("correct horse battery").unwrap();
    let mut times: Vec<Duration> = (0..samples)
        .map(|_| {
            let started = Instant::now();
            black_box(passwords.verify("correct horse battery", &hash));
            started.elapsed()
        })
        .collect();
    times.sort();
    println!(
        "argon2id verify m=19456 t=2 p=1: p50 {:.1} ms, p99 {:.1} ms ({samples} samples)",
        common::percentile(&times, 0.5).as_secs_f64() * 1e3,
        common::percentile(&times, 0.99).as_secs_f64() * 1e3,
    );
}
