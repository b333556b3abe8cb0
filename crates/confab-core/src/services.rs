//! Use cases over the ports. Each takes the ports it needs; none does I/O of its own.

pub mod ai;
pub mod auth;
pub mod chats;
pub mod delivery;
pub mod media;
pub mod presence;
