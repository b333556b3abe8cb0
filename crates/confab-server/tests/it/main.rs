//! The one integration-test binary (STYLE §7): every module drives confab the way a user does.

mod cli;
mod config;
mod helpers;
mod http;
