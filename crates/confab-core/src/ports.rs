//! The ports: one trait per backend confab talks to (SPEC §1), each with its contract.
//!
//! Every port reports its own [`health::ComponentHealth`]; `/ready`, `/health` and
//! `confab doctor` are built from those reports and nothing else.

pub mod blob;
pub mod broker;
pub mod cache;
pub mod health;
pub mod llm;
pub mod mailer;
pub mod store;
