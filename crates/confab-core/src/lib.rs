//! confab's core: the domain, the ports every backend implements, and the use cases over them.
//!
//! Architecture invariant: this crate does no I/O of its own and depends on no driver (no
//! axum, SQL, Redis, AMQP, object-store, SMTP or HTTP-client crate). Adapters implement the
//! traits in [`ports`]; the server wires them together.

pub mod domain;
pub mod error;
pub mod ports;
pub mod priority;
pub mod services;
pub mod settings;
#[cfg(feature = "testing")]
pub mod testing;
