//! The one integration-test binary (STYLE §7): every module drives confab the way a user does.
// Tests state their expectations with unwrap/expect: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

#[macro_use]
mod auth;
mod ai;
mod cache;
mod chats;
mod cli;
mod config;
mod delivery;
mod helpers;
mod http;
mod live;
mod logs;
mod mail;
mod media;
mod nodes;
mod realtime;
mod store;

/// The Rust Socket.IO client the load tool uses too.
#[path = "../../../../bench/sio.rs"]
mod sio;

/// Multipart forms and photos, as the load tool uploads them.
#[path = "../../../../bench/upload.rs"]
mod upload;
